"""Command-line reports over the warehouse.

    python -m pipeline.infra.report signal   [--db FILE]   does any score mean something? (per layer)
    python -m pipeline.infra.report ablation [--db FILE]   simulation vs ablation scores
    python -m pipeline.infra.report classification [--db FILE]   simulation, detection, fuzzing, ablation

`signal` prints, per layer of the current model: how many distinct LLM explanations there are and
how many copy few-shot text or were shared by many units (degenerate); the reported (test-split)
score of each unit's best explanation beside its control and the paired test's verdict; and the LLM
against the token-space explanation under the same simulator, with the exact lookup reference.
`ablation` prints each ablated unit's simulation and ablation scores and their Spearman rank
correlation (does a better simulation also carry more of what the neuron does for the output?).
`classification` prints, per layer, the mean detection and fuzzing scores beside their controls, what
each scorer and the simulation cost per unit, and the Spearman rank correlations between the
simulation (test), detection, fuzzing and ablation scores of the layer's units (do the cheap scorers
rank explanations as simulation does?).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.core.interpret import LLM, TOKEN_LOOKUP, TOKEN_SPACE, layer_discrimination
from pipeline.infra.warehouse import default_database, open_warehouse

QUERIES = Path(__file__).resolve().parents[2] / "warehouse" / "queries"


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


METRICS = ("simulation", "detection", "fuzzing", "ablation")


def classification_report(database: str | Path) -> list[dict]:
    """One dict per layer: units, per-scorer means, costs and the pairwise rank correlations of
    METRICS over the units that have both scores (pairwise complete)."""
    with open_warehouse(str(database), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("select table_name from information_schema.tables").fetchall()}
        if "current_classification_scores" not in tables:
            return []
        sim = conn.sql(
            "select layer, neuron, polarity, corr_all as simulation from atlas.current_scores"
            " where split = 'test' and best"
        ).pl()
        cls = conn.sql(
            "select layer, neuron, polarity, scorer, balanced_accuracy, control_balanced_accuracy, gap, auc,"
            " n_prompts, prompt_tokens, completion_tokens, control_prompt_tokens, control_completion_tokens,"
            " control_neuron is not null as has_control from atlas.current_classification_scores"
        ).pl()
        abl = (
            conn.sql("select layer, neuron, polarity, ablation_score as ablation from atlas.current_ablations").pl()
            if "current_ablations" in tables
            else pl.DataFrame(
                schema={"layer": pl.Int32, "neuron": pl.Int32, "polarity": pl.String, "ablation": pl.Float64}
            )
        )
    key = ["layer", "neuron", "polarity"]
    wide = sim
    for scorer in ("detection", "fuzzing"):
        part = cls.filter(pl.col("scorer") == scorer).select(*key, pl.col("balanced_accuracy").alias(scorer))
        wide = wide.join(part, on=key, how="full", coalesce=True)
    wide = wide.join(abl, on=key, how="left")
    out = []
    for layer in sorted(cls["layer"].unique().to_list()):
        units = wide.filter(pl.col("layer") == layer)
        row: dict = {"layer": layer, "units": units.height, "scorers": {}, "correlations": {}}
        for scorer in ("detection", "fuzzing"):
            part = cls.filter((pl.col("layer") == layer) & (pl.col("scorer") == scorer))
            asked = part.filter(pl.col("n_prompts").is_not_null())
            requests = asked["n_prompts"] * (1 + asked["has_control"].cast(pl.Int64))
            prompt = asked["prompt_tokens"] + asked["control_prompt_tokens"].fill_null(0)
            completion = asked["completion_tokens"] + asked["control_completion_tokens"].fill_null(0)
            row["scorers"][scorer] = {
                "scored": part["balanced_accuracy"].drop_nulls().len(),
                "mean": _mean(part["balanced_accuracy"]),
                "mean_control": _mean(part["control_balanced_accuracy"]),
                "mean_gap": _mean(part["gap"]),
                "mean_auc": _mean(part["auc"]),
                "requests_per_unit": _mean(requests),
                "prompt_tokens_per_unit": _mean(prompt),
                "completion_tokens_per_unit": _mean(completion),
            }
        for i, a in enumerate(METRICS):
            for b in METRICS[i + 1 :]:
                both = units.drop_nulls([a, b])
                rho = rank_correlation(both[a].to_numpy(), both[b].to_numpy())
                row["correlations"][(a, b)] = (rho, both.height)
        out.append(row)
    return out


def print_classification(rows: list[dict]) -> None:
    if not rows:
        print("no classification_scores in the warehouse yet: materialize classification_scores")
    for r in rows:
        print(f"Layer {r['layer']}: {r['units']} units")
        for scorer, s in r["scorers"].items():
            print(
                f"  {scorer}: {s['scored']} scored, balanced accuracy {_fmt(s['mean'])}, control "
                f"{_fmt(s['mean_control'])}, gap {_fmt(s['mean_gap'])}, AUC {_fmt(s['mean_auc'])}; per unit "
                f"(with its control) {_amount(s['requests_per_unit'])} requests, "
                f"{_amount(s['prompt_tokens_per_unit'])} prompt + {_amount(s['completion_tokens_per_unit'])} "
                "completion tokens"
            )
        print("  Spearman rank correlation over the layer's units (pairs with both scores):")
        for (a, b), (rho, n) in r["correlations"].items():
            shown = f"{rho:+.3f}" if rho is not None else "undefined (fewer than 3 pairs, or constant scores)"
            print(f"    {a:>10} vs {b:<10} {shown}  (n = {n})")


def _mean(series: pl.Series) -> float | None:
    values = series.drop_nulls()
    return float(values.mean()) if len(values) else None


def _amount(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def signal_report(database: str | Path) -> list[dict]:
    """One dict per layer with every number `signal` prints (also what the README quotes)."""
    with open_warehouse(str(database), read_only=True) as conn:
        explanations = conn.sql(
            "select layer, neuron, polarity, kind, sample_index, explanation, degenerate_reason, copies_redrawn "
            "from atlas.current_explanations"
        ).pl()
        scores = conn.sql("select * from atlas.current_scores").pl()
    out = []
    for layer in sorted(explanations["layer"].unique().to_list()):
        exp = explanations.filter((pl.col("layer") == layer) & (pl.col("kind") == LLM))
        written = exp.filter(pl.col("explanation").is_not_null())
        degenerate = written["degenerate_reason"].drop_nulls()
        sc = scores.filter(pl.col("layer") == layer)
        test = sc.filter(pl.col("split") == "test")
        best = test.filter(pl.col("best"))
        verdict = layer_discrimination(sc, layer)
        kinds = {k: test.filter(pl.col("selected") & (pl.col("kind") == k)) for k in (LLM, TOKEN_SPACE, TOKEN_LOOKUP)}
        paired = (
            kinds[LLM]
            .join(kinds[TOKEN_SPACE], on=["neuron", "polarity"], suffix="_ts")
            .drop_nulls(["corr_all", "corr_all_ts"])
        )
        out.append(
            {
                "layer": layer,
                "units": exp.select("neuron", "polarity").n_unique(),
                "llm_explanations": written.height,
                "llm_distinct": written["explanation"].n_unique(),
                "llm_copies_of_few_shot": int(degenerate.str.starts_with("repeats the few-shot").sum()),
                "llm_copies_redrawn": int(exp["copies_redrawn"].fill_null(0).sum()),
                "llm_shared_by_many": int(degenerate.str.starts_with("the same explanation").sum()),
                "best_kinds": dict(best.group_by("kind").len().iter_rows()),
                "mean_score": _mean(best["corr_all"]),
                "mean_control": _mean(best["control_corr_all"]),
                "mean_gap": verdict.mean_gap,
                "p_value": verdict.p_value,
                "discriminates": verdict.passed,
                "verdict": verdict.verdict,
                **{f"mean_{k}": _mean(v["corr_all"]) for k, v in kinds.items()},
                **{f"gap_{k}": _mean(v["gap"]) for k, v in kinds.items()},
                "llm_beats_token_space": int((paired["corr_all"] > paired["corr_all_ts"]).sum()),
                "llm_vs_token_space_pairs": paired.height,
            }
        )
    return out


def print_signal(rows: list[dict]) -> None:
    if not rows:
        print("no explanations in the warehouse yet")
    for r in rows:
        print(f"Layer {r['layer']}: {r['units']} units")
        print(
            f"  LLM explanations: {r['llm_explanations']} written, {r['llm_distinct']} distinct, "
            f"{r['llm_copies_of_few_shot']} copy few-shot text ({r['llm_copies_redrawn']} copies drawn again before), "
            f"{r['llm_shared_by_many']} shared by many units"
        )
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["best_kinds"].items())) or "none"
        print(f"  best explanation per unit (chosen on valid): {kinds}")
        print(
            f"  reported test score {_fmt(r['mean_score'])}, control {_fmt(r['mean_control'])}, "
            f"gap {_fmt(r['mean_gap'])}, p = {r['p_value'] if r['p_value'] is None else format(r['p_value'], '.3g')}"
        )
        print(
            f"  same simulator, test split: LLM {_fmt(r['mean_llm'])} (gap {_fmt(r['gap_llm'])}), token space "
            f"{_fmt(r['mean_token_space'])} (gap {_fmt(r['gap_token_space'])}); LLM better on "
            f"{r['llm_beats_token_space']}/{r['llm_vs_token_space_pairs']} units"
        )
        print(f"  exact token-lookup reference: {_fmt(r['mean_token_lookup'])} (gap {_fmt(r['gap_token_lookup'])})")
        print(f"  verdict: {r['verdict']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", choices=["signal", "ablation", "classification"])
    parser.add_argument(
        "--db", default=str(default_database()), help="warehouse file, or ducklake:postgres:<libpq connection string>"
    )
    args = parser.parse_args(argv)
    if args.report == "signal":
        print_signal(signal_report(args.db))
        return
    if args.report == "classification":
        print_classification(classification_report(args.db))
        return
    frame, rho = ablation_report(args.db)
    with pl.Config(tbl_rows=100, tbl_cols=12, fmt_str_lengths=60):
        print(frame.drop("explanation"))
    n = frame.drop_nulls(["simulation_score", "ablation_score"]).height
    shown = f"{rho:.3f}" if rho is not None else "undefined (fewer than 3 scored units, or constant scores)"
    print(f"Spearman rank correlation of simulation (test) and ablation scores over {n} units: {shown}")


if __name__ == "__main__":
    main()
