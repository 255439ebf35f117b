"""Ablation scores for one layer: choose units, take their calibrated test simulations, ablate, tabulate.

Units are the layer's best by reported (test-split) score, plus an optional seeded random sample
of the other scored units, so that the ablation score can be compared across the range of
simulation scores. Each unit's chosen explanation is ablated on its test sequences: the neuron's
signed activation is replaced by the calibrated simulation of that direction (negated back for
'-'), or by the neuron's mean activation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict

import numpy as np
import polars as pl

from pipeline.core.ablation import LayerAblator, ablate_neurons
from pipeline.core.scoring import Calibration
from pipeline.core.units import UNIT_SCHEMA, Unit, UnitKey

ABLATION_SCHEMA = {
    **UNIT_SCHEMA,
    "selection": pl.String,
    "kind": pl.String,
    "sample_index": pl.Int16,
    "explanation": pl.String,
    "test_score": pl.Float64,
    "calibration_slope": pl.Float64,
    "calibration_intercept": pl.Float64,
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


def choose_units(scores: pl.DataFrame, layer: int, top_n: int, random_n: int, seed: int) -> pl.DataFrame:
    """The best `top_n` units by reported (test) score, and `random_n` random others, with the
    explanation each is scored by: (neuron, polarity, kind, sample_index, test_score, calibration, selection)."""
    if top_n < 0 or random_n < 0:
        raise ValueError("the numbers of units to ablate must not be negative")
    best = (
        scores.filter(
            (pl.col("layer") == layer) & (pl.col("split") == "test") & pl.col("best") & pl.col("corr_all").is_not_null()
        )
        .sort("corr_all", "neuron", "polarity", descending=[True, False, False])
        .select(
            "neuron", "polarity", "kind", "sample_index", pl.col("corr_all").alias("test_score"),
            "calibration_slope", "calibration_intercept", "calibration_reason", "simulator_backend", "simulator_model",
        )
    )  # fmt: skip
    top = best.head(top_n).with_columns(pl.lit("top").alias("selection"))
    rest = best.slice(top_n)
    picked = rest.sample(min(random_n, rest.height), seed=seed) if rest.height and random_n else rest.head(0)
    return pl.concat([top, picked.with_columns(pl.lit("random").alias("selection"))])


def ablate_layer(
    ablator: LayerAblator,
    prefix: Sequence[int],
    chosen: pl.DataFrame,
    units: Mapping[UnitKey, Unit],
    explanations: pl.DataFrame,
    simulations: pl.DataFrame,
    means: Mapping[int, float],
    log: Callable[[str], None] | None = None,
) -> pl.DataFrame:
    layer = ablator.layer
    rows: list[dict] = []
    replacements: dict[tuple[int, str], dict[str, dict[int, np.ndarray]]] = {}
    info: dict[tuple[int, str], dict] = {}
    sequences: dict[int, np.ndarray] = {}
    for pick in chosen.iter_rows(named=True):
        neuron, polarity = pick["neuron"], pick["polarity"]
        unit = units[(layer, neuron, polarity)]
        explanation = explanations.filter(
            (pl.col("neuron") == neuron) & (pl.col("polarity") == polarity)
            & (pl.col("kind") == pick["kind"]) & (pl.col("sample_index") == pick["sample_index"])
        )["explanation"]  # fmt: skip
        base = {k: pick[k] for k in ("neuron", "polarity", "selection", "kind", "sample_index", "test_score")}
        base |= {
            "layer": layer,
            "explanation": explanation[0] if len(explanation) else None,
            "mean_activation": means[neuron],
            "simulator_backend": pick["simulator_backend"],
            "simulator_model": pick["simulator_model"],
        }
        if pick["calibration_slope"] is None or pick["calibration_reason"] is not None:
            rows.append(base | {"failure_reason": f"no calibration: {pick['calibration_reason']}"})
            continue
        calibration = Calibration(pick["calibration_slope"], pick["calibration_intercept"], None)
        base |= {"calibration_slope": calibration.slope, "calibration_intercept": calibration.intercept}
        sims = {
            r["seq_id"]: np.asarray(r["simulated"], dtype=np.float64)
            for r in simulations.filter(
                (pl.col("neuron") == neuron) & (pl.col("polarity") == polarity) & (pl.col("kind") == pick["kind"])
                & (pl.col("sample_index") == pick["sample_index"]) & (pl.col("split") == "test")
                & ~pl.col("control") & pl.col("simulated").is_not_null()
            ).iter_rows(named=True)
        }  # fmt: skip
        test = unit.split("test")
        missing = [e.seq_id for e in test if e.seq_id not in sims]
        if missing or not test:
            rows.append(base | {"failure_reason": f"no test simulation of sequences {missing}"})
            continue
        for e in test:
            sequences[e.seq_id] = np.asarray(e.token_ids, dtype=np.int64)
        # The calibrated simulation is in the unit's direction; the neuron gets it back with its sign.
        # A rectified unit (its neuron's other direction is a unit too) replaces only its own side:
        # the other side keeps its true activations, in the simulated and in the mean ablation alike,
        # whose mean is then the direction's mean over the unit's random records.
        if unit.rectified:
            randoms = [unit.true(e) for e in unit.examples if e.kind == "random"]
            mean = unit.sign * float(np.mean(np.concatenate(randoms))) if randoms else 0.0
        else:
            mean = means[neuron]
        replacements[(neuron, polarity)] = {
            "mean": {e.seq_id: mean + unit.other(e) for e in test},
            "simulated": {e.seq_id: unit.sign * calibration.apply(sims[e.seq_id]) + unit.other(e) for e in test},
        }
        base["mean_activation"] = mean
        info[(neuron, polarity)] = base | {"n_sequences": len(test)}
    if replacements:
        # All units' rows (each on its own test sequences) share the batches of one run.
        results = ablate_neurons(ablator, sequences, prefix, replacements)
        for key, res in results.items():
            rows.append(
                info[key]
                | asdict(res)
                | {
                    "loss_delta_mean": res.loss_mean - res.loss_unablated,
                    "loss_delta_simulated": res.loss_simulated - res.loss_unablated,
                }
            )
        if log is not None:
            log(f"ablated layer {layer} units {sorted(results)}")
    return pl.DataFrame(rows, schema=ABLATION_SCHEMA).sort("neuron", "polarity")
