"""The `ablations` asset: a thin wrapper over `pipeline.core.ablate_layer`."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    Output,
    ResourceParam,
    StaticPartitionsDefinition,
    asset,
)

from assets.common import (
    RECORD_COLUMNS,
    atlas_asset_args,
    identity_of,
    land_layer,
    partition_layers,
    preview,
    require_same_model,
    strip_lineage,
    versioned_output,
)
from assets.config import AblationConfig, refuse_moved_knobs
from assets.io import WarehouseDbIOManager
from assets.resources import SubjectModelResource
from pipeline.core.ablate_layer import ABLATION_SCHEMA, ablate_layer, choose_units
from pipeline.core.ablation import LayerAblator
from pipeline.core.corpus import prefix_ids
from pipeline.core.units import units_from_frames


def build_ablation_assets(layers_def: StaticPartitionsDefinition) -> list[AssetsDefinition]:
    @asset(
        code_version="2",
        ins={"activation_records": AssetIn(metadata={"columns": [*RECORD_COLUMNS, "mean_activation"]})},
        **atlas_asset_args(layers_def, columns=ABLATION_SCHEMA),
    )
    def ablations(
        context: AssetExecutionContext,
        scores: pl.DataFrame,
        explanations: pl.DataFrame,
        simulations: pl.DataFrame,
        unit_examples: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        activation_records: pl.DataFrame,
        subject: SubjectModelResource,
        config: AblationConfig,
        warehouse: ResourceParam[WarehouseDbIOManager],
    ) -> Output[pl.DataFrame]:
        """Per ablated unit (the best by test score, and optionally random others): KL of the
        next-token distribution when the neuron is replaced by its mean vs by its calibrated test
        simulation, loss deltas, and 1 − KL(simulated)/KL(mean)."""
        refuse_moved_knobs(context)
        identity = identity_of(unit_examples)
        loaded = subject.load()
        require_same_model(identity, loaded.identity)
        units = units_from_frames(strip_lineage(unit_examples), corpus_tokens, activation_records)
        frames = []
        for layer in partition_layers(context):
            chosen = choose_units(scores, layer, config.top_n, config.random_n, config.seed)
            picked = [f"{n}{p}" for n, p in chosen.select("neuron", "polarity").iter_rows()]
            context.log.info(f"layer {layer}: ablating units {picked}")
            if chosen.height == 0:
                continue
            means = {
                r["neuron"]: float(r["mean_activation"])
                for r in activation_records.filter(pl.col("layer") == layer).iter_rows(named=True)
            }
            frames.append(
                ablate_layer(
                    LayerAblator(loaded.model, layer, config.batch_size),
                    prefix_ids(loaded.tokenizer),
                    chosen,
                    units,
                    explanations.filter(pl.col("layer") == layer),
                    simulations.filter(pl.col("layer") == layer),
                    means,
                    log=context.log.info,
                )
            )
            land_layer(context, warehouse, layer, frames[-1], identity)
        frame = pl.concat(frames) if frames else pl.DataFrame(schema=ABLATION_SCHEMA)
        scored = frame.filter(pl.col("ablation_score").is_not_null())
        context.add_output_metadata(
            {
                "ablated": frame.height,
                "scored": scored.height,
                "mean_ablation_score": float(scored["ablation_score"].mean()) if scored.height else None,
                "preview": preview(
                    frame,
                    ["layer", "neuron", "polarity", "test_score", "kl_mean", "kl_simulated", "ablation_score"],
                    10,
                ),
            }
            | ({} if scored.height else {"note": MetadataValue.text("no neuron could be scored")})
        )
        return versioned_output(frame, identity, context)

    return [ablations]
