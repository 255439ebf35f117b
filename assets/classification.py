"""The `classification_scores` asset: detection and fuzzing per layer, a thin wrapper over `pipeline.core.classify`."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

from collections.abc import Iterator

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    ResourceParam,
    StaticPartitionsDefinition,
    asset,
)

from assets.common import (
    LLM_POOL,
    RECORD_COLUMNS,
    atlas_asset_args,
    failure_reasons,
    identity_of,
    land_layer,
    partition_layers,
    preview,
    strip_lineage,
    versioned_output,
)
from assets.config import ClassifyConfig, refuse_moved_knobs
from assets.io import WarehouseDbIOManager
from assets.llm_metadata import usage_metadata
from assets.resources import SimulatorResource
from pipeline.core.classify import (
    CLASSIFICATION_SCHEMA,
    QUANTILE_LISTS,
    SCORERS,
    classification_discrimination,
    classify_layer,
    with_quantiles,
)
from pipeline.core.failures import check_failure_share
from pipeline.core.units import units_from_frames

CLASSIFIER_DISCRIMINATES = "classifier_discriminates"
# The per-direction quantile lists read from activation_records (`pipeline.core.classify.QUANTILE_LISTS`):
# 'quantile' (bins by max) for '+' units, 'quantile_neg' (bins by -min) for '-' units.
QUANTILE_COLUMNS = [QUANTILE_LISTS["+"], QUANTILE_LISTS["-"]]


def _histogram01(values: list[float], bins: int = 10) -> str:
    """A text histogram over [0, 1] for the materialization page."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts) or 1
    lines = [f"{i / bins:.1f}..{(i + 1) / bins:.1f} | {'#' * round(20 * c / top)} {c}" for i, c in enumerate(counts)]
    return "```\n" + "\n".join(lines) + "\n```"


def build_classification_assets(layers_def: StaticPartitionsDefinition) -> list[AssetsDefinition]:
    @asset(
        code_version="2",
        pool=LLM_POOL,
        ins={"activation_records": AssetIn(metadata={"columns": [*RECORD_COLUMNS, *QUANTILE_COLUMNS]})},
        check_specs=[
            AssetCheckSpec(
                CLASSIFIER_DISCRIMINATES,
                asset="classification_scores",
                description="Each scorer's balanced accuracy beats its control (another unit's explanation on the "
                "same prompts) clearly enough, over the layers just written: a paired sign-flip test per scorer.",
            )
        ],
        **atlas_asset_args(layers_def, columns=CLASSIFICATION_SCHEMA),
    )
    def classification_scores(
        context: AssetExecutionContext,
        scores: pl.DataFrame,
        explanations: pl.DataFrame,
        unit_examples: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        activation_records: pl.DataFrame,
        simulator: SimulatorResource,
        config: ClassifyConfig,
        warehouse: ResourceParam[WarehouseDbIOManager],
    ) -> Iterator:
        """Per explained unit and scorer (detection, fuzzing): its best explanation's accuracy, balanced
        accuracy, F1 and AUC (where the model gives label probabilities) on held-out quantile samples and as
        many non-activating texts, beside the control (another unit's explanation on the same prompts)."""
        refuse_moved_knobs(context)
        spec = config.spec()
        identity = identity_of(unit_examples)
        units = units_from_frames(strip_lineage(unit_examples), corpus_tokens, activation_records)
        units = with_quantiles(units, activation_records, corpus_tokens)
        chosen = scores.filter((pl.col("split") == "test") & pl.col("best"))
        client = simulator.classifier() if chosen.height else None
        if client is not None:
            context.log.info(f"scoring {chosen.height} units with {client.backend}:{client.model} ({spec.scorers})")
        before = client.usage.snapshot() if client else {}
        frames = []
        for layer in partition_layers(context):  # controls pair units of one layer, so layers are independent
            frames.append(
                classify_layer(
                    strip_lineage(explanations).filter(pl.col("layer") == layer),
                    strip_lineage(scores).filter(pl.col("layer") == layer),
                    units,
                    client,
                    spec,
                    log=context.log.info,
                )
            )
            land_layer(context, warehouse, layer, frames[-1], identity)
        frame = pl.concat(frames)
        spent = usage_metadata(client.usage, before, "scorer") if client else {}
        context.log.info(f"scorer usage: {spent}")
        asked = frame.filter(pl.col("n_prompts").is_not_null())
        outcomes = [(r, 1) for r in asked["failure_reason"].to_list()]
        check_failure_share(outcomes, simulator.max_failure_share, "classified units")
        layers = partition_layers(context)
        verdicts = {(la, s): classification_discrimination(frame, la, s) for la in layers for s in spec.scorers}
        yield versioned_output(frame, identity, context, metadata=_metadata(frame, verdicts, spent))
        failing = [f"{layer}/{s}" for (layer, s), v in verdicts.items() if not v.passed]
        yield AssetCheckResult(
            check_name=CLASSIFIER_DISCRIMINATES,
            passed=not failing,
            severity=AssetCheckSeverity.WARN,
            description=" ".join(f"Layer {layer} {s}: {v.verdict}" for (layer, s), v in verdicts.items()),
            metadata={
                "failing": MetadataValue.text(", ".join(failing) or "none"),
                **{
                    f"layer_{layer}_{s}_{k}": v
                    for (layer, s), d in verdicts.items()
                    for k, v in d.as_metadata().items()
                    if v is not None
                },
            },
        )

    return [classification_scores]


def _metadata(frame: pl.DataFrame, verdicts: dict, spent: dict) -> dict:
    meta: dict = dict(spent) | {
        "rows": frame.height,
        "scored": frame.filter(pl.col("balanced_accuracy").is_not_null()).height,
        "signal": MetadataValue.md("\n".join(f"- layer {la} {s}: {v.verdict}" for (la, s), v in verdicts.items())),
        "failure_reasons": failure_reasons(frame),
    }
    for scorer in SCORERS:
        part = frame.filter((pl.col("scorer") == scorer) & pl.col("balanced_accuracy").is_not_null())
        if not part.height:
            continue
        meta[f"mean_{scorer}_balanced_accuracy"] = float(part["balanced_accuracy"].mean())
        if part["control_balanced_accuracy"].count():
            meta[f"mean_{scorer}_control"] = float(part["control_balanced_accuracy"].mean())
        if part["auc"].count():
            meta[f"mean_{scorer}_auc"] = float(part["auc"].mean())
        meta[f"histogram_{scorer}"] = MetadataValue.md(_histogram01(part["balanced_accuracy"].to_list()))
    columns = ["layer", "neuron", "polarity", "scorer", "balanced_accuracy", "control_balanced_accuracy", "auc"]
    meta["preview"] = preview(frame.sort("balanced_accuracy", descending=True, nulls_last=True), columns, 10)
    return meta
