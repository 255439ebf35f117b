"""Warehouse bytes per neuron: `python -m bench.storage [--db FILE]`, after a run (e.g. `make materialize`).

Prints the DuckDB file's size and the bytes its used blocks hold, each per captured neuron (a row of
`activation_records`), against the goal of 8 KB per neuron, and each table's share: the storage
blocks its column segments occupy (`pragma_storage_info`; a block shared by several tables counts
for each). The ratio to the goal is measured on the file as it is, in one run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.infra.warehouse import SCHEMA, default_database, open_warehouse

GOAL_BYTES_PER_NEURON = 8 * 1024


@dataclass
class Storage:
    file_bytes: int
    used_bytes: int
    neurons: int
    table_bytes: dict[str, int] = field(default_factory=dict)  # blocks x block size, per table
    table_rows: dict[str, int] = field(default_factory=dict)

    @property
    def used_per_neuron(self) -> float:
        return self.used_bytes / self.neurons

    @property
    def file_per_neuron(self) -> float:
        return self.file_bytes / self.neurons


def measure(database: str) -> Storage:
    """Sizes of a local warehouse file (not a DuckLake: its data lives in Parquet files)."""
    path = Path(database)
    if not path.is_file():
        raise SystemExit(f"no warehouse file at {database}: run `make materialize` first, or pass --db")
    with open_warehouse(database, read_only=True) as conn:
        ((block_size, used_blocks),) = conn.execute(
            "select block_size, used_blocks from pragma_database_size() where database_name = current_database()"
        ).fetchall()
        tables = [
            name
            for (name,) in conn.execute(
                "select table_name from duckdb_tables() where schema_name = ? order by table_name", [SCHEMA]
            ).fetchall()
        ]
        if "activation_records" not in tables:
            raise SystemExit(f"{database} has no {SCHEMA}.activation_records: nothing was captured")
        storage = Storage(path.stat().st_size, block_size * used_blocks, 0)
        for table in tables:
            qualified = f"{SCHEMA}.{table}"
            (rows,) = conn.execute(f"select count(*) from {qualified}").fetchone()
            (blocks,) = conn.execute(
                f"select count(distinct block_id) from pragma_storage_info('{qualified}') where block_id >= 0"
            ).fetchone()
            storage.table_rows[table] = rows
            storage.table_bytes[table] = blocks * block_size
        storage.neurons = storage.table_rows["activation_records"]
    if storage.neurons == 0:
        raise SystemExit(f"{database}: activation_records is empty")
    return storage


def format_report(database: str, s: Storage) -> str:
    kib = 1024
    out = [
        f"warehouse: {database}",
        f"neurons captured (rows of activation_records): {s.neurons:,}",
        f"file: {s.file_bytes / kib / kib:,.1f} MiB = {s.file_per_neuron / kib:,.1f} KiB per neuron"
        f" (includes free blocks left by rewrites)",
        f"used blocks: {s.used_bytes / kib / kib:,.1f} MiB = {s.used_per_neuron / kib:,.1f} KiB per neuron",
        f"ratio used / goal ({GOAL_BYTES_PER_NEURON // kib} KiB per neuron): "
        f"{s.used_per_neuron / GOAL_BYTES_PER_NEURON:.2f}   "
        + ("MET" if s.used_per_neuron <= GOAL_BYTES_PER_NEURON else "NOT MET"),
        "",
        f"  {'table':<24}{'rows':>10}{'MiB':>10}{'KiB/neuron':>12}",
    ]
    for table, size in sorted(s.table_bytes.items(), key=lambda item: -item[1]):
        out.append(f"  {table:<24}{s.table_rows[table]:>10,}{size / kib / kib:>10.1f}{size / s.neurons / kib:>12.2f}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=default_database(), help="warehouse file (default: the pipeline's)")
    args = parser.parse_args(argv)
    print(format_report(args.db, measure(args.db)))


if __name__ == "__main__":
    main()
