"""A real PostgreSQL server for tests: Debian's `postgresql` binaries, a fresh cluster made with
`initdb` in a temporary directory, started with `pg_ctl` on 127.0.0.1 on a free port, and stopped
and deleted at the end.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user (the Debian
package creates it) in a directory that user owns. The cluster uses password authentication
(scram-sha-256) with a random password for its superuser, handed to clients as PGPASSWORD in the
environment (libpq, psycopg2 and DuckDB's postgres extension all read it), so no connection string
holds it. Without the binaries the fixture skips, unless NEURON_ATLAS_REQUIRE_POSTGRES is set (CI
sets it, and `.ci/run` installs the package), where it fails.

Use it as a context manager, e.g. in a module-scoped fixture:

    @pytest.fixture(scope="module")
    def postgres() -> Iterator[PostgresServer]:
        with postgres_server() as server:
            yield server

then `postgres.create_database(name)` for a connection string per test.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "atlas"
REQUIRE_ENV = "NEURON_ATLAS_REQUIRE_POSTGRES"


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl are: PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name.split(".")[0])
    )
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    password: str
    run_as: str | None  # the OS user running the server (None: this process's user)
    host: str = "127.0.0.1"
    user: str = SUPERUSER

    def libpq(self, dbname: str = "postgres") -> str:
        """A libpq key/value connection string without the password (clients get PGPASSWORD)."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """A postgresql:// URL without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def client_env(self) -> dict[str, str]:
        """Variables a client process needs beside the connection string."""
        return {"PGPASSWORD": self.password}

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql over TCP (as any client would); returns its output, fails loudly."""
        done = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", self.libpq(dbname), "-c", sql],
            env={**os.environ, **self.client_env()},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """A new empty database; returns its libpq connection string."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database names here are plain identifiers, got {name!r}")
        self.psql(f"CREATE DATABASE {name}")
        return self.libpq(name)

    def log_tail(self, chars: int = 3000) -> str:
        log = self.root / "server.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _as_server_user(run_as: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", run_as, "--", *argv] if run_as else argv


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set: install Debian's postgresql package)")
    pytest.skip(reason)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started server with a fresh cluster; stopped (fast shutdown) and removed afterwards."""
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)")
    assert bindir is not None
    run_as: str | None = None
    if os.geteuid() == 0:
        run_as = "postgres"
        try:
            account = pwd.getpwnam(run_as)
        except KeyError:
            _missing("running as root needs the 'postgres' user (created by Debian's postgresql package)")
    # as root: /tmp, which the server user can reach (a private TMPDIR may not be)
    root = Path(tempfile.mkdtemp(prefix="atlas-pg-", dir="/tmp" if run_as else None))
    if run_as:
        os.chown(root, account.pw_uid, account.pw_gid)
    password = secrets.token_hex(16)
    server = PostgresServer(bindir, root, _free_port(), password, run_as)
    data = root / "data"
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, account.pw_uid, account.pw_gid)
    pwfile.chmod(0o600)

    def run(argv: list[str], timeout: float = 120) -> None:
        done = subprocess.run(_as_server_user(run_as, argv), capture_output=True, text=True, timeout=timeout, cwd=root)
        if done.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{server.log_tail()}"
            )

    started = False
    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])  # fmt: skip
        pwfile.unlink()
        # TCP on loopback only; the Unix socket lives in the cluster's own directory, not /var/run.
        options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} -c max_connections=200 -c fsync=off"
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "-t", "60",
             "start"])  # fmt: skip
        started = True
        yield server
    finally:
        if started:
            subprocess.run(
                _as_server_user(run_as, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
                timeout=120,
                cwd=root,
            )
        shutil.rmtree(root, ignore_errors=True)
