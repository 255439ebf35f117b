"""Ablation scores for one layer: choose neurons, calibrate their simulations, ablate, tabulate.

Neurons are the layer's best LLM explanations by `corr_all` (each neuron's best sample), plus an
optional seeded random sample of the other scored neurons, so that the ablation score can be
compared across the range of simulation scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import polars as pl

from pipeline.ablation import LayerAblator, ablate_neurons, fit_calibration
from pipeline.interpret import LLM, NeuronExamples
from pipeline.llm import LLMFailure
from pipeline.simulator import Simulator

ABLATION_SCHEMA = {
    "layer": pl.Int32,
    "neuron": pl.Int32,
    "selection": pl.String,
    "sample_index": pl.Int16,
    "explanation": pl.String,
    "corr_all": pl.Float64,
    "calibration_slope": pl.Float64,
    "calibration_intercept": pl.Float64,
    "calibration_r": pl.Float64,
    "calibration_reason": pl.String,
    "mean_activation": pl.Float64,
    "kl_mean": pl.Float64,
    "kl_simulated": pl.Float64,
    "loss_unablated": pl.Float64,
    "loss_mean": pl.Float64,
    "loss_simulated": pl.Float64,
    "loss_delta_mean": pl.Float64,
    "loss_delta_simulated": pl.Float64,
    "ablation_score": pl.Float64,
    "ablation_score_reason": pl.String,
    "n_sequences": pl.Int32,
    "failure_reason": pl.String,
    "simulator_backend": pl.String,
    "simulator_model": pl.String,
}


def choose_neurons(scores: pl.DataFrame, layer: int, top_n: int, random_n: int, seed: int) -> pl.DataFrame:
    """(neuron, sample_index, corr_all, selection) for the best `top_n` and `random_n` random others."""
    if top_n < 0 or random_n < 0:
        raise ValueError("the numbers of neurons to ablate must not be negative")
    best = (
        scores.filter((pl.col("layer") == layer) & (pl.col("kind") == LLM) & pl.col("corr_all").is_not_null())
        .sort("corr_all", "sample_index", descending=[True, False])
        .unique("neuron", keep="first", maintain_order=True)
        .select("neuron", "sample_index", "corr_all")
    )
    top = best.head(top_n).with_columns(pl.lit("top").alias("selection"))
    rest = best.slice(top_n)
    picked = rest.sample(min(random_n, rest.height), seed=seed) if rest.height and random_n else rest.head(0)
    return pl.concat([top, picked.with_columns(pl.lit("random").alias("selection"))])


def ablate_layer(
    ablator: LayerAblator,
    prefix: Sequence[int],
    chosen: pl.DataFrame,
    examples: dict[tuple[int, int], NeuronExamples],
    explanations: pl.DataFrame,
    simulations: pl.DataFrame,
    means: dict[int, float],
    simulator: Simulator,
    progress: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    layer = ablator.layer
    lineage = {"simulator_backend": simulator.backend, "simulator_model": simulator.model}
    rows: list[dict] = []
    replacements: dict[int, dict[str, dict[int, np.ndarray]]] = {}
    info: dict[int, dict] = {}
    sequences: dict[int, np.ndarray] = {}
    for pick in chosen.iter_rows(named=True):
        neuron, sample = pick["neuron"], pick["sample_index"]
        ex = examples[(layer, neuron)]
        text = explanations.filter(
            (pl.col("neuron") == neuron) & (pl.col("kind") == LLM) & (pl.col("sample_index") == sample)
        )["explanation"][0]
        base = {"layer": layer, "neuron": neuron, "selection": pick["selection"], "sample_index": sample}
        base |= {"explanation": text, "corr_all": pick["corr_all"], "mean_activation": means[neuron]} | lineage
        sims = {
            (r["record_kind"], r["seq_id"]): np.asarray(r["simulated"], dtype=np.float64)
            for r in simulations.filter(
                (pl.col("neuron") == neuron)
                & (pl.col("kind") == LLM)
                & (pl.col("sample_index") == sample)
                & pl.col("simulated").is_not_null()
            ).iter_rows(named=True)
        }
        missing = [h.seq_id for h in ex.held_out if (h.record_kind, h.seq_id) not in sims]
        calibration = simulator.simulate(text, [h.tokens for h in ex.calibration]) if ex.calibration else []
        if missing or isinstance(calibration, LLMFailure):
            why = f"no simulation of held-out sequences {missing}" if missing else calibration.reason  # type: ignore[union-attr]
            rows.append(base | {"failure_reason": why})
            continue
        cal = fit_calibration(calibration, [h.acts for h in ex.calibration])
        base |= {
            "calibration_slope": cal.slope,
            "calibration_intercept": cal.intercept,
            "calibration_r": cal.r,
            "calibration_reason": cal.reason,
        }
        for h in ex.held_out:
            sequences[h.seq_id] = np.asarray(h.token_ids, dtype=np.int64)
        replacements[neuron] = {
            "mean": {h.seq_id: np.full(len(h.token_ids), means[neuron]) for h in ex.held_out},
            "simulated": {h.seq_id: cal.apply(sims[(h.record_kind, h.seq_id)]) for h in ex.held_out},
        }
        info[neuron] = base | {"n_sequences": len(ex.held_out)}
        if progress is not None:
            progress(f"calibrated layer {layer} neuron {neuron}: slope {cal.slope:.3g}, intercept {cal.intercept:.3g}")
    if replacements:
        # All neurons' rows (each on its own held-out sequences) share the batches of one run.
        results = ablate_neurons(ablator, sequences, prefix, replacements)
        for n, res in results.items():
            rows.append(
                info[n]
                | asdict(res)
                | {
                    "loss_delta_mean": res.loss_mean - res.loss_unablated,
                    "loss_delta_simulated": res.loss_simulated - res.loss_unablated,
                }
            )
        if progress is not None:
            progress(f"ablated layer {layer} neurons {sorted(results)}")
    return pl.DataFrame(rows, schema=ABLATION_SCHEMA).sort("neuron")
