"""Explanations, simulations and scores: per layer, thin wrappers over `pipeline.core.interpret`."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

from collections import Counter
from collections.abc import Iterator

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    MetadataValue,
    Output,
    ResourceParam,
    StaticPartitionsDefinition,
    asset,
)

from assets.common import (
    LLM_POOL,
    RECORD_ACTS,
    atlas_asset_args,
    failure_reasons,
    identity_of,
    land_layer,
    partition_layers,
    preview,
    strip_lineage,
    versioned_output,
)
from assets.config import ExplainConfig, refuse_moved_knobs
from assets.io import WarehouseDbIOManager
from assets.llm_metadata import usage_metadata
from assets.resources import ExplainerResource, SimulatorResource
from pipeline.core.failures import check_failure_share, explanation_outcomes, simulation_outcomes
from pipeline.core.interpret import (
    CANDIDATE_KINDS,
    EXPLANATION_SCHEMA,
    LLM,
    SCORE_COLUMN_DOCS,
    SCORE_SCHEMA,
    SIMULATION_SCHEMA,
    TOKEN_LOOKUP,
    explain_layer,
    layer_discrimination,
    score_layer,
    simulate_layer,
)
from pipeline.core.units import select_units, units_from_frames

DISCRIMINATES = "simulator_discriminates"


def _histogram(values: list[float], bins: int = 10) -> str:
    """A text histogram over [-1, 1] for the materialization page."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v + 1) / 2 * bins)))] += 1
    top = max(counts) or 1
    lines = [
        f"{-1 + 2 * i / bins:+.1f}..{-1 + 2 * (i + 1) / bins:+.1f} | {'#' * round(20 * c / top)} {c}"
        for i, c in enumerate(counts)
    ]
    return "```\n" + "\n".join(lines) + "\n```"


def build_interpret_assets(layers_def: StaticPartitionsDefinition) -> list[AssetsDefinition]:
    @asset(
        code_version="2",
        pool=LLM_POOL,
        ins={"activation_records": RECORD_ACTS},
        **atlas_asset_args(layers_def, columns=EXPLANATION_SCHEMA),
    )
    def explanations(
        context: AssetExecutionContext,
        unit_examples: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        activation_records: pl.DataFrame,
        explainer: ExplainerResource,
        config: ExplainConfig,
        warehouse: ResourceParam[WarehouseDbIOManager],
    ) -> Output[pl.DataFrame]:
        """Per unit: the LLM's explanations of its train top records, its token-space explanation and
        the token-lookup reference; copies of few-shot text and explanations shared by many units are
        flagged degenerate. Each layer is committed when it is done."""
        refuse_moved_knobs(context)
        identity = identity_of(unit_examples)
        units = units_from_frames(strip_lineage(unit_examples), corpus_tokens, activation_records)
        selected = {}
        for layer in partition_layers(context):
            n = unit_examples.filter(pl.col("layer") == layer)["neuron"].n_unique()
            selected[layer] = select_units(units, layer, n, config.n_neurons, config.neuron_ids)
        backend = explainer.client()
        total = sum(map(len, selected.values()))
        context.log.info(f"explaining {total} units with {backend.backend}:{backend.model} ({backend.api})")
        before = backend.usage.snapshot()
        frames = []
        for layer, layer_units in selected.items():
            frames.append(explain_layer(layer_units, backend, config.params(), log=context.log.info))
            land_layer(context, warehouse, layer, frames[-1], identity)
        frame = pl.concat(frames)
        llm_rows = frame.filter(pl.col("kind") == LLM)
        ok = llm_rows.filter(pl.col("explanation").is_not_null())
        spent = usage_metadata(backend.usage, before, "explainer")
        context.log.info(f"explainer usage: {spent}")
        check_failure_share(explanation_outcomes(frame, LLM), explainer.max_failure_share, "explainer requests")
        context.add_output_metadata(
            spent
            | {
                "explanations": frame.height,
                "llm_explanations": llm_rows.height,
                "llm_failed": llm_rows.height - ok.height,
                "llm_distinct": ok["explanation"].n_unique(),
                "degenerate": frame.filter(pl.col("degenerate_reason").is_not_null()).height,
                "copies_redrawn": int(llm_rows["copies_redrawn"].fill_null(0).sum()),
                "tokens_spent": int(
                    frame["prompt_tokens"].fill_null(0).sum() + frame["completion_tokens"].fill_null(0).sum()
                ),
                "preview": preview(
                    frame.filter(pl.col("kind") != TOKEN_LOOKUP),
                    ["layer", "neuron", "polarity", "kind", "explanation", "degenerate_reason"],
                    16,
                ),
                "failure_reasons": failure_reasons(frame),
            }
        )
        return versioned_output(frame, identity, context)

    @asset(
        code_version="2",
        pool=LLM_POOL,
        ins={"activation_records": RECORD_ACTS},
        **atlas_asset_args(layers_def, columns=SIMULATION_SCHEMA),
    )
    def simulations(
        context: AssetExecutionContext,
        explanations: pl.DataFrame,
        unit_examples: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        activation_records: pl.DataFrame,
        simulator: SimulatorResource,
        warehouse: ResourceParam[WarehouseDbIOManager],
    ) -> Output[pl.DataFrame]:
        """Per explanation: simulated levels on the valid split (every candidate), on calibration and
        test (each kind's chosen one), and the control on test (another unit's explanation). Each
        layer is committed when it is done."""
        identity = identity_of(unit_examples)
        units = units_from_frames(strip_lineage(unit_examples), corpus_tokens, activation_records)
        needs_llm = explanations.filter(pl.col("kind").is_in(CANDIDATE_KINDS) & pl.col("explanation").is_not_null())
        client = simulator.client() if needs_llm.height else None
        before = client.usage.snapshot() if client else {}
        frames = []
        for layer in partition_layers(context):  # controls pair units of one layer, so layers are independent
            layer_explanations = strip_lineage(explanations).filter(pl.col("layer") == layer)
            frames.append(simulate_layer(layer_explanations, units, client, log=context.log.info))
            land_layer(context, warehouse, layer, frames[-1], identity)
        frame = pl.concat(frames)
        spent = usage_metadata(client.usage, before, "simulator") if client else {}
        context.log.info(f"simulator usage: {spent}")
        examples = Counter((*key, e.split) for key, u in units.items() for e in u.examples)
        outcomes = simulation_outcomes(frame, CANDIDATE_KINDS, examples)
        check_failure_share(outcomes, simulator.max_failure_share, "simulated sequences")
        context.add_output_metadata(
            spent
            | {
                "rows": frame.height,
                "failed": frame.filter(pl.col("simulated").is_null()).height,
                "simulator": f"{client.backend}:{client.model} {client.prompt_version}" if client else "lookup only",
                "failure_reasons": failure_reasons(frame),
            }
        )
        return versioned_output(frame, identity, context)

    @asset(
        code_version="2",
        check_specs=[
            AssetCheckSpec(
                DISCRIMINATES,
                asset="scores",
                description="Each unit's reported score beats its control (another unit's explanation on the "
                "same sequences) clearly enough, over the layers just written: a paired sign-flip test.",
            )
        ],
        **atlas_asset_args(layers_def, columns=SCORE_SCHEMA, column_docs=SCORE_COLUMN_DOCS),
    )
    def scores(context: AssetExecutionContext, simulations: pl.DataFrame, unit_examples: pl.DataFrame) -> Iterator:
        """Per explanation and split (valid, test): correlation (top+random, top, random), calibrated r²
        and absolute deviation explained, the control's correlation and the gap; `best` marks each
        unit's chosen explanation, whose test row is its score."""
        identity = identity_of(unit_examples)
        frame = score_layer(strip_lineage(simulations))
        layers = partition_layers(context)
        verdicts = {layer: layer_discrimination(frame, layer) for layer in layers}
        yield versioned_output(frame, identity, context, metadata=_score_metadata(frame, verdicts))
        failing = [layer for layer, v in verdicts.items() if not v.passed]
        yield AssetCheckResult(
            check_name=DISCRIMINATES,
            passed=not failing,
            severity=AssetCheckSeverity.WARN,
            description=" ".join(f"Layer {layer}: {v.verdict}" for layer, v in verdicts.items()),
            metadata={
                "layers_failing": MetadataValue.text(", ".join(map(str, failing)) or "none"),
                **{
                    f"layer_{layer}_{k}": v
                    for layer, d in verdicts.items()
                    for k, v in d.as_metadata().items()
                    if v is not None
                },
            },
        )

    return [explanations, simulations, scores]


def _score_metadata(frame: pl.DataFrame, verdicts: dict) -> dict:
    test = frame.filter(pl.col("split") == "test")
    best = test.filter(pl.col("best") & pl.col("corr_all").is_not_null())
    meta: dict = {
        "units_scored": best.height,
        "mean_test_score": float(best["corr_all"].mean()) if best.height else None,
        "mean_control": float(best["control_corr_all"].mean()) if best["control_corr_all"].count() else None,
        "mean_gap": float(best["gap"].mean()) if best["gap"].count() else None,
        "signal": MetadataValue.md("\n".join(f"- layer {layer}: {v.verdict}" for layer, v in verdicts.items())),
        "histogram_best_test": MetadataValue.md(_histogram(best["corr_all"].to_list())),
    }
    for kind in (*CANDIDATE_KINDS, TOKEN_LOOKUP):
        values = test.filter(pl.col("selected") & (pl.col("kind") == kind))["corr_all"].drop_nulls()
        meta[f"mean_test_{kind}"] = float(values.mean()) if len(values) else None
    columns = ["layer", "neuron", "polarity", "kind", "corr_all", "control_corr_all", "gap", "r2_all"]
    ranked = best.sort("corr_all", descending=True)
    meta["best"] = preview(ranked, columns, 5)
    meta["worst"] = preview(ranked.reverse(), columns, 5)
    return {k: v for k, v in meta.items() if v is not None}
