"""The DuckDB warehouse: where the file lives and the SQL views kept as files under warehouse/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def view_files() -> list[Path]:
    return sorted(VIEWS_DIR.glob("*.sql"))


def create_views(conn: Any) -> list[str]:
    """(Re)create every view whose tables exist yet; returns the names created."""
    import duckdb

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
