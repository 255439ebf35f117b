"""Command-line reports over the warehouse: `python -m pipeline.report ablation [--db FILE]`.

`ablation` prints each ablated neuron's simulation and ablation scores and their Spearman rank
correlation (does a better simulation also carry more of what the neuron does for the output?).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.warehouse import default_database, open_warehouse

QUERIES = Path(__file__).resolve().parents[1] / "warehouse" / "queries"


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho (average ranks for ties); None below 3 pairs or for a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3:
        return None
    rx = pl.Series(x).rank("average").to_numpy()
    ry = pl.Series(y).rank("average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def ablation_report(database: str | Path) -> tuple[pl.DataFrame, float | None]:
    with open_warehouse(str(database), read_only=True) as conn:
        frame = conn.sql((QUERIES / "ablation_vs_simulation.sql").read_text()).pl()
    both = frame.drop_nulls(["simulation_score", "ablation_score"])
    return frame, rank_correlation(both["simulation_score"].to_numpy(), both["ablation_score"].to_numpy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", choices=["ablation"])
    parser.add_argument(
        "--db", default=str(default_database()), help="warehouse file, or ducklake:postgres:<libpq connection string>"
    )
    args = parser.parse_args(argv)
    frame, rho = ablation_report(args.db)
    with pl.Config(tbl_rows=100, tbl_cols=12, fmt_str_lengths=60):
        print(frame.drop("explanation"))
    n = frame.drop_nulls(["simulation_score", "ablation_score"]).height
    shown = f"{rho:.3f}" if rho is not None else "undefined (fewer than 3 scored neurons, or constant scores)"
    print(f"Spearman rank correlation of simulation and ablation scores over {n} neurons: {shown}")


if __name__ == "__main__":
    main()
