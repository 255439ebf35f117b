"""The DuckDB warehouse: where the file lives, how it is opened, and the SQL views kept as files
under warehouse/.

DuckDB lets one process at a time open a file for writing, so every connection the pipeline makes
goes through `open_warehouse`: an inter-process file lock beside the database makes the steps of
concurrent runs (and of the multiprocess executor) take turns, each holding the file only for one
read or one write transaction. Waiting on a lock queues instead of failing; only a holder outside
the pipeline (a `duckdb` shell left open) can make a step fail, after a bounded wait, with an
error naming the file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock, Timeout

SCHEMA = "atlas"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
VIEWS_DIR = PROJECT_ROOT / "warehouse" / "views"


def default_database() -> str:
    """NEURON_ATLAS_DB, else warehouse/neuron_atlas.duckdb in the project."""
    return os.environ.get("NEURON_ATLAS_DB") or str(PROJECT_ROOT / "warehouse" / "neuron_atlas.duckdb")


def check_database_name(database: str) -> None:
    """DuckDB names the catalog after the file, so `atlas.duckdb` would make `atlas.x` ambiguous."""
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
    database: str, read_only: bool = False, config: dict[str, Any] | None = None, wait_s: float | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection held under the warehouse lock; closed (and the lock freed) on exit."""
    check_database_name(database)
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


def view_files() -> list[Path]:
    return sorted(VIEWS_DIR.glob("*.sql"))


def create_views(conn: Any) -> list[str]:
    """(Re)create every view whose tables exist yet; returns the names created."""
    existing = {
        row[0]
        for row in conn.execute(
            "select table_name from information_schema.tables where table_schema = ? and table_type = 'BASE TABLE'",
            [SCHEMA],
        ).fetchall()
    }
    created = []
    for path in view_files():
        needs = {
            line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("-- requires:")
        }
        needed_tables = {t.strip() for item in needs for t in item.split(",")}
        if not needed_tables <= existing:
            continue
        try:
            conn.execute(path.read_text())
        except duckdb.Error as exc:
            raise RuntimeError(f"view {path.name} failed: {exc}") from exc
        created.append(path.stem)
    return created
