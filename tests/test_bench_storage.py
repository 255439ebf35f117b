"""The storage benchmark on warehouse files built here: bytes per neuron from the file's used blocks."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from bench.storage import GOAL_BYTES_PER_NEURON, format_report, measure


def _warehouse(path: Path, neurons: int, floats_per_neuron: int) -> str:
    conn = duckdb.connect(str(path))
    conn.execute("create schema atlas")
    conn.execute(
        "create table atlas.activation_records as select range::int as neuron,"
        f" [random()::float for _ in range({floats_per_neuron})] as acts from range({neurons})"
    )
    conn.execute("create table atlas.explanations as select 1 as neuron, 'x' as explanation")
    conn.close()
    return str(path)


def test_bytes_per_neuron_follow_what_each_neuron_stores(tmp_path: Path) -> None:
    """4,096 random float32 a neuron (16 KiB raw; uniform values in [0, 1) compress a little) stay
    over the 8 KiB goal; 16 floats a neuron stay far under it."""
    heavy = measure(_warehouse(tmp_path / "heavy.duckdb", 2000, 4096))
    light = measure(_warehouse(tmp_path / "light.duckdb", 2000, 16))
    assert heavy.neurons == light.neurons == 2000
    assert heavy.used_per_neuron > GOAL_BYTES_PER_NEURON > light.used_per_neuron * 4
    assert heavy.table_bytes["activation_records"] > heavy.table_bytes["explanations"]
    assert heavy.used_bytes <= heavy.file_bytes
    assert "NOT MET" in format_report("heavy", heavy) and "NOT MET" not in format_report("light", light)


def test_a_warehouse_without_records_is_refused_plainly(tmp_path: Path) -> None:
    path = tmp_path / "empty.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("create schema atlas")
    conn.close()
    with pytest.raises(SystemExit, match="no atlas.activation_records"):
        measure(str(path))
    with pytest.raises(SystemExit, match="no warehouse file"):
        measure(str(tmp_path / "missing.duckdb"))
