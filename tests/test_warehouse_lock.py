"""The warehouse lock: a second process waits its turn instead of failing, and a holder outside
the pipeline gives a clear error after a bounded wait."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.infra.warehouse import WarehouseBusy, open_warehouse

HOLD = """
import sys, time, duckdb
from pipeline.infra.warehouse import open_warehouse
database, how, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if how == "pipeline":
    with open_warehouse(database) as conn:
        print("held", flush=True)
        time.sleep(seconds)
        conn.execute("insert into t values (2)")
else:
    conn = duckdb.connect(database)
    print("held", flush=True)
    time.sleep(seconds)
"""


def _hold(database: Path, how: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(database), how, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "neuron_atlas.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("create table t (x int); insert into t values (1)")
    return path


def test_a_second_step_waits_for_the_first_and_sees_its_write(database: Path) -> None:
    holder = _hold(database, "pipeline", 1.5)
    start = time.monotonic()
    with open_warehouse(str(database), read_only=True) as conn:
        waited = time.monotonic() - start
        rows = conn.execute("select x from t order by x").fetchall()
    holder.wait(timeout=30)
    assert waited > 0.5 and rows == [(1,), (2,)]


def test_a_step_gives_up_on_a_long_turn_with_a_clear_error(database: Path) -> None:
    holder = _hold(database, "pipeline", 3)
    with pytest.raises(WarehouseBusy, match="stayed locked by another Neuron Atlas step"):
        with open_warehouse(str(database), wait_s=0.3):
            pass
    holder.wait(timeout=30)


def test_an_outside_holder_is_named_in_the_error(database: Path) -> None:
    holder = _hold(database, "duckdb", 3)
    with pytest.raises(WarehouseBusy, match="held open by another process"):
        with open_warehouse(str(database), wait_s=0.5):
            pass
    holder.wait(timeout=30)
    with open_warehouse(str(database), wait_s=0.5) as conn:  # free again once it is closed
        assert conn.execute("select count(*) from t").fetchone() == (1,)
