"""The warehouse: where it lives, how it is opened, and the SQL views kept as files under warehouse/.

Two kinds, chosen by NEURON_ATLAS_DB:

- A DuckDB file (the default, warehouse/neuron_atlas.duckdb). DuckDB lets one process at a time
  open a file for writing, so every connection the pipeline makes goes through `open_warehouse`:
  an inter-process file lock beside the database makes the steps of concurrent runs (and of the
  multiprocess executor) take turns, each holding the file only for one read or one write
  transaction. Waiting on a lock queues instead of failing; only a holder outside the pipeline (a
  `duckdb` shell left open) can make a step fail, after a bounded wait, with an error naming the
  file.
- A DuckLake (`ducklake:postgres:<libpq connection string>`, data files under
  NEURON_ATLAS_DATA_PATH): a PostgreSQL catalog that many processes on many machines read and
  write at once, with snapshot isolation. No lock is taken: readers never wait for writers, and
  writers commit optimistically. DuckLake settles commit races itself when the changes do not
  overlap; a write that truly conflicts with one committed meanwhile (DuckLake 0.4 counts any
  insert into a table another transaction deleted from, whatever the rows) fails and is retried
  whole by the caller (`retry_on_conflict`). The `ducklake` and `postgres` extensions are loaded
  from their PyPI packages (`duckdb-extension-ducklake`, `duckdb-extension-postgres-scanner`),
  never downloaded at run time.
"""

from __future__ import annotations

import graphlib
import hashlib
import importlib.util
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
from filelock import FileLock, Timeout

SCHEMA = "atlas"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
VIEWS_DIR = PROJECT_ROOT / "warehouse" / "views"
LAKE_PREFIX = "ducklake:postgres:"
DATA_PATH_ENV = "NEURON_ATLAS_DATA_PATH"
# The DuckLake's name in a connection (`USE`d, so `atlas.<table>` resolves as on a DuckDB file).
LAKE_ALIAS = "neuron_atlas"
T = TypeVar("T")


def default_database() -> str:
    """NEURON_ATLAS_DB, else warehouse/neuron_atlas.duckdb in the project."""
    return os.environ.get("NEURON_ATLAS_DB") or str(PROJECT_ROOT / "warehouse" / "neuron_atlas.duckdb")


def default_data_path() -> str | None:
    """NEURON_ATLAS_DATA_PATH: where a DuckLake keeps its data files (needed when it is created)."""
    return os.environ.get(DATA_PATH_ENV) or None


def is_lake(database: str) -> bool:
    return database.startswith("ducklake:")


def lake_catalog(database: str) -> str:
    """The libpq connection string of a DuckLake's Postgres catalog, checked.

    A password in it would be stored in Dagster's run config and shown in the UI, so it is refused:
    libpq reads PGPASSWORD, ~/.pgpass (PGPASSFILE) or a service file (PGSERVICE) instead."""
    if not database.startswith(LAKE_PREFIX):
        raise ValueError(
            f"unsupported DuckLake catalog {database.split(' ')[0]!r}: use {LAKE_PREFIX}<libpq connection string>, "
            "e.g. 'ducklake:postgres:host=db.internal dbname=atlas user=atlas' (a PostgreSQL catalog lets many "
            "machines write; DuckDB and SQLite catalogs allow one writer)"
        )
    catalog = database[len(LAKE_PREFIX) :].strip()
    if not catalog:
        raise ValueError(f"{database!r} names no catalog: add a libpq connection string after {LAKE_PREFIX}")
    refuse_password(catalog, "the warehouse's connection string")
    return catalog


def refuse_password(conninfo: str, what: str) -> None:
    """A libpq connection string (key=value or URL) must not carry a password."""
    if re.search(r"(^|\s)password\s*=|://[^/@\s]*:[^/@\s]*@|[?&]password=", conninfo):
        raise ValueError(
            f"{what} holds a password, which would be stored in run config and logs: remove it and set "
            "PGPASSWORD, or use ~/.pgpass (PGPASSFILE) or a service file (PGSERVICE)"
        )


def sidecar_dir(database: str) -> Path:
    """Where files that belong with the warehouse (the viewer's files, a local response cache) go:
    beside a DuckDB file; for a DuckLake, beside a local data path (never inside it, where DuckLake's
    orphan-file cleanup would delete them), else warehouse/ in the project."""
    if not is_lake(database):
        return Path(database).resolve().parent
    data_path = default_data_path()
    if data_path and "://" not in data_path:
        return Path(data_path).resolve().parent
    return PROJECT_ROOT / "warehouse"


def check_database_name(database: str) -> None:
    """DuckDB names the catalog after the file, so `atlas.duckdb` would make `atlas.x` ambiguous."""
    if is_lake(database):
        lake_catalog(database)
        return
    if Path(database).stem == SCHEMA:
        raise ValueError(
            f"the warehouse file may not be named {SCHEMA}.duckdb (DuckDB would confuse it with the "
            f"schema {SCHEMA!r}): choose another name, e.g. neuron_atlas.duckdb"
        )


def lock_timeout_s() -> float:
    """How long a step waits for the other steps' reads and writes (NEURON_ATLAS_LOCK_TIMEOUT)."""
    return float(os.environ.get("NEURON_ATLAS_LOCK_TIMEOUT", "1800"))


def warehouse_lock(database: str) -> FileLock:
    """One lock object per file in a process (re-entrant), shared by all its threads' turns."""
    return FileLock(f"{database}.lock", is_singleton=True)


class WarehouseBusy(RuntimeError):
    """The file stayed locked past the timeout."""


@contextmanager
def open_warehouse(
    database: str,
    read_only: bool = False,
    config: dict[str, Any] | None = None,
    wait_s: float | None = None,
    data_path: str | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection held under the warehouse lock; closed (and the lock freed) on exit. On a
    DuckLake there is no lock: a connection with the lake attached (read-only when asked)."""
    check_database_name(database)
    if is_lake(database):
        conn = connect_lake(database, read_only=read_only, config=config, data_path=data_path)
        try:
            yield conn
        finally:
            conn.close()
        return
    wait_s = lock_timeout_s() if wait_s is None else wait_s
    lock = warehouse_lock(database)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout as exc:
        raise WarehouseBusy(
            f"the warehouse {database} stayed locked by another Neuron Atlas step for {wait_s:.0f} s "
            "(raise NEURON_ATLAS_LOCK_TIMEOUT for very long writes)"
        ) from exc
    try:
        conn = _connect(database, read_only, config or {}, deadline=time.monotonic() + min(wait_s, 120.0))
        try:
            yield conn
        finally:
            conn.close()
    finally:
        lock.release()


def _connect(database: str, read_only: bool, config: dict[str, Any], deadline: float) -> duckdb.DuckDBPyConnection:
    """Retries while a process outside the pipeline holds DuckDB's own lock on the file."""
    delay = 0.05
    while True:
        try:
            return duckdb.connect(database, read_only=read_only, config={"custom_user_agent": "neuron-atlas", **config})
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                raise WarehouseBusy(
                    f"the warehouse {database} is held open by another process (a duckdb shell or "
                    f"notebook?): close it and rerun. DuckDB says: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def extension_file(name: str) -> Path:
    """The packaged extension file built for this DuckDB (DuckDB loads no other version's)."""
    package = {"postgres_scanner": "duckdb_extension_postgres_scanner"}.get(name, f"duckdb_extension_{name}")
    spec = importlib.util.find_spec(package)
    version = duckdb.__version__
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        path = root / "extensions" / f"v{version}" / f"{name}.duckdb_extension"
        if path.is_file():
            return path
    pip_name = package.replace("_", "-")
    raise RuntimeError(
        f"the DuckDB extension {name!r} for duckdb {version} is not installed: pip install '{pip_name}=={version}'"
        " (the project pins the pair in pyproject.toml)"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _local_data_path(data_path: str) -> str:
    """A local data path made absolute (every process must name the same files), ending in a slash."""
    if "://" in data_path:
        return data_path if data_path.endswith("/") else data_path + "/"
    path = Path(data_path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path) + "/"


def connect_lake(
    database: str, read_only: bool = False, config: dict[str, Any] | None = None, data_path: str | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the DuckLake attached as `neuron_atlas` and made the default
    catalog. The data path is stored in the catalog when the lake is created; later connections
    may omit it (given, it must match)."""
    catalog = lake_catalog(database)
    settings = {"custom_user_agent": "neuron-atlas", "autoinstall_known_extensions": False, **(config or {})}
    conn = duckdb.connect(":memory:", config=settings)
    try:
        for name in ("postgres_scanner", "ducklake"):
            conn.execute(f"LOAD {_literal(str(extension_file(name)))}")
        options = []
        data_path = data_path or default_data_path()
        if data_path and not read_only:
            options.append(f"DATA_PATH {_literal(_local_data_path(data_path))}")
        if read_only:
            options.append("READ_ONLY")
        suffix = f" ({', '.join(options)})" if options else ""
        try:
            conn.execute(f"ATTACH {_literal('ducklake:postgres:' + catalog)} AS {LAKE_ALIAS}{suffix}")
        except duckdb.Error as exc:
            if "data_path is not set" in str(exc):
                raise RuntimeError(
                    f"the DuckLake at {catalog!r} does not exist yet, and creating it needs a data path: set "
                    f"{DATA_PATH_ENV} to a shared directory every machine reaches by the same path"
                ) from exc
            if "creating a new DuckLake is explicitly disabled" in str(exc):
                raise RuntimeError(f"no DuckLake at {catalog!r} yet: materialize something before reading it") from exc
            raise
        conn.execute(f"USE {LAKE_ALIAS}")
    except BaseException:
        conn.close()
        raise
    return conn


def commit_attempts() -> int:
    """How many times a DuckLake write is tried when it conflicts (NEURON_ATLAS_COMMIT_ATTEMPTS)."""
    return max(1, int(os.environ.get("NEURON_ATLAS_COMMIT_ATTEMPTS", "20")))


def is_commit_conflict(exc: BaseException) -> bool:
    """DuckLake's answer to a commit that overlaps one committed since the transaction began."""
    return isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower()


def retry_on_conflict(
    attempt: Callable[[], T], attempts: int | None = None, log: Callable[[str], None] | None = None
) -> T:
    """Run a whole write transaction again when DuckLake reports a commit conflict: nothing of the
    failed try was committed, so trying again is safe. Bounded, with jittered exponential backoff;
    the last conflict is raised with the count."""
    attempts = commit_attempts() if attempts is None else attempts
    delay = 0.2
    for n in range(1, attempts + 1):
        try:
            return attempt()
        except duckdb.Error as exc:
            if not is_commit_conflict(exc) or n == attempts:
                if is_commit_conflict(exc):
                    raise RuntimeError(
                        f"the write conflicted with other writers {attempts} times in a row "
                        f"(raise NEURON_ATLAS_COMMIT_ATTEMPTS): {exc}"
                    ) from exc
                raise
            wait = random.uniform(0, delay)
            if log:
                log(f"DuckLake commit conflict (try {n} of {attempts}), retrying in {wait:.1f} s: {exc}")
            time.sleep(wait)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def view_files() -> list[Path]:
    return sorted(VIEWS_DIR.glob("*.sql"))


def view_requirements(path: Path) -> set[str]:
    """The tables and views a view file reads, from its `-- requires:` lines."""
    return {
        name.strip()
        for line in path.read_text().splitlines()
        if line.startswith("-- requires:")
        for name in line.split(":", 1)[1].split(",")
        if name.strip()
    }


def views_for(tables: set[str]) -> list[Path]:
    """The view files that can be made over these base tables, each after the views it reads.

    A view can be made when every table it requires exists and every view it requires can be
    made; a view under the name of an existing table (an old name kept by a warehouse that two
    versions write) is not. So a view may build on another whatever their names' order (views
    that require each other raise graphlib.CycleError)."""
    files = {path.stem: path for path in view_files()}
    needs = {name: view_requirements(path) for name, path in files.items()}
    order = list(graphlib.TopologicalSorter({n: reqs & files.keys() for n, reqs in needs.items()}).static_order())
    makeable: set[str] = set()
    for name in order:
        if name not in tables and all(r in tables or r in makeable for r in needs[name]):
            makeable.add(name)
    return [files[name] for name in order if name in makeable]


def _view_digest(sql: str) -> str:
    return "neuron-atlas view sha256:" + hashlib.sha256(sql.encode()).hexdigest()[:16]


# Tables renamed since their first release (old name -> new). An older warehouse's table is renamed
# in place before the first read or write through the IO manager, and a view under the old name
# (warehouse/views) keeps saved SQL working.
RENAMED_TABLES: dict[str, str] = {"top_k_examples": "unit_examples"}

# Columns added to a table after its first release, at its end (inserts are positional), which the
# views read: a table written before then gains them (NULL in the old rows, which the views read as
# the old meaning: a NULL polarity is '+').
APPENDED_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "unit_examples": [("polarity", "VARCHAR")],
    "explanations": [("copies_redrawn", "SMALLINT")],
}


def _base_tables(conn: Any) -> set[str]:
    return {
        row[0]
        for row in conn.execute(
            "select table_name from information_schema.tables where table_schema = ? and table_type = 'BASE TABLE'",
            [SCHEMA],
        ).fetchall()
    }


def upgrade_tables(conn: Any) -> None:
    """Bring the tables of an older warehouse up to date in place, in a transaction of its own
    (DuckDB cannot alter a table that the same transaction has modified): rename the tables renamed
    since (RENAMED_TABLES; then the views, which read the new names, are made again), and give
    the tables written before APPENDED_COLUMNS existed those columns."""
    existing = _base_tables(conn)
    renamed = False
    for old, new in RENAMED_TABLES.items():
        if old in existing and new not in existing:
            conn.execute(f"alter table {SCHEMA}.{old} rename to {new}")
            existing = (existing - {old}) | {new}
            renamed = True
    for table, columns in APPENDED_COLUMNS.items():
        if table not in existing:
            continue
        have = {
            row[0]
            for row in conn.execute(
                "select column_name from information_schema.columns where table_schema = ? and table_name = ?",
                [SCHEMA, table],
            ).fetchall()
        }
        for name, kind in columns:
            if name not in have:
                conn.execute(f"alter table {SCHEMA}.{table} add column {name} {kind}")
    if renamed:
        create_views(conn)


def create_views(conn: Any, only_changed: bool = False) -> list[str]:
    """(Re)create every view whose tables exist yet, each after the views it reads; returns the
    names created.

    only_changed (for a DuckLake): skip views whose stored comment holds the file's digest, so
    concurrent writers do not all redefine the same views in every commit (each redefinition is a
    catalog change that conflicts with the others')."""
    existing = _base_tables(conn)
    stored: dict[str, str | None] = {}
    if only_changed:
        stored = dict(
            conn.execute(
                "select view_name, comment from duckdb_views()"
                " where schema_name = ? and database_name = current_database()",
                [SCHEMA],
            ).fetchall()
        )
    created = []
    for path in views_for(existing):
        sql = path.read_text()
        if only_changed and stored.get(path.stem) == _view_digest(sql):
            continue
        try:
            conn.execute(sql)
            if only_changed:
                conn.execute(f"comment on view {SCHEMA}.{path.stem} is {_literal(_view_digest(sql))}")
        except duckdb.Error as exc:
            if is_commit_conflict(exc):
                raise
            raise RuntimeError(f"view {path.name} failed: {exc}") from exc
        created.append(path.stem)
    return created
