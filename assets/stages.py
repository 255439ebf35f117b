"""The stage assets. Each is a thin call into `pipeline`, plus lineage columns and metadata."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

from collections.abc import Sequence

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetMaterialization,
    AssetsDefinition,
    BackfillPolicy,
    DataVersion,
    MetadataValue,
    Output,
    StaticPartitionsDefinition,
    asset,
)

from assets.automation import RERUN
from assets.io import WarehouseDbIOManager
from assets.resources import CorpusResource, SamplingResource, SubjectModelResource
from pipeline.corpus import prefix_ids, tokenize_corpus
from pipeline.errors import AtlasInputError
from pipeline.examples import top_k_examples as build_top_k_examples
from pipeline.mlp import check_layers, mlp_is_gated, mlp_projections, neuron_count
from pipeline.models import ModelIdentity
from pipeline.progress import duration
from pipeline.records import collect_activation_records, records_frame
from pipeline.units import RECORD_COLUMNS

WAREHOUSE = "warehouse"
LAYER_METADATA = {"partition_expr": "layer"}
# What the interpretation steps read of activation_records: the lists top_k_examples refers to and
# the activations of their sequences (`pipeline.units.units_from_frames`).
RECORD_ACTS = AssetIn(metadata={"columns": RECORD_COLUMNS})


def layer_partitions(n_layers: int) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition([str(i) for i in range(n_layers)])


def _lineage(frame: pl.DataFrame, identity: ModelIdentity, context: AssetExecutionContext) -> pl.DataFrame:
    """Prefix every row with model id, revision, run id and the asset's code version."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    return frame.select(
        pl.lit(identity.model_id).alias("model_id"),
        pl.lit(identity.revision).alias("model_revision"),
        pl.lit(context.run.run_id).alias("run_id"),
        pl.lit(code_version, dtype=pl.String).alias("code_version"),
        pl.all(),
    )


def _identity_of(subject_model: pl.DataFrame) -> ModelIdentity:
    row = subject_model.row(0, named=True)
    return ModelIdentity(row["model_id"], row["model_revision"])


def _require_same_model(recorded: ModelIdentity, current: ModelIdentity) -> None:
    if recorded != current:
        raise AtlasInputError(
            f"the configured model is {current.data_version} but subject_model holds {recorded.data_version}:"
            " materialize subject_model (and corpus_tokens) first"
        )


def _layers(context: AssetExecutionContext) -> list[int]:
    return sorted(int(key) for key in context.partition_keys)


def land_layer(
    context: AssetExecutionContext,
    warehouse: WarehouseDbIOManager,
    layer: int,
    frame: pl.DataFrame,
    identity: ModelIdentity,
) -> None:
    """Commit a finished layer of a multi-layer step now, and record that partition as
    materialized, so its rows are queryable (and the UI shows it) even if a later layer fails or
    the run is killed. The step's output at the end writes every layer again (the same rows); a
    one-layer step, or its last layer, is left to that output alone."""
    layers = _layers(context)
    if len(layers) < 2 or layer == layers[-1]:
        return
    table = context.asset_key.path[-1]
    warehouse.write_partition(table, layer, _lineage(frame, identity, context), context.log.warning)
    context.log_event(
        AssetMaterialization(
            asset_key=context.asset_key,
            partition=str(layer),
            description="committed as soon as this layer was done; the step goes on with its other layers",
            metadata={"rows": frame.height},
        )
    )
    context.log.info(f"layer {layer}: {frame.height} rows committed")


def _preview(frame: pl.DataFrame, columns: Sequence[str], rows: int = 10) -> MetadataValue:
    head = frame.select(columns).head(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in head.iter_rows()]
    return MetadataValue.md("\n".join(lines))


def build_stage_assets(n_layers: int) -> list[AssetsDefinition]:
    """The stage assets, with one layer partition per layer of the configured model."""
    layers_def = layer_partitions(n_layers)

    @asset(
        io_manager_key=WAREHOUSE,
        code_version="1",
        automation_condition=RERUN,
        group_name="atlas",
        backfill_policy=BackfillPolicy.single_run(),
        deps=["model_checkpoint"],
    )
    def subject_model(context: AssetExecutionContext, subject: SubjectModelResource) -> Output[pl.DataFrame]:
        """The subject model: loaded (converted once if embedded) and identified by revision or hash."""
        loaded = subject.load()
        projections = mlp_projections(loaded.model)
        frame = _lineage(
            pl.DataFrame(
                {
                    "source": [subject.model],
                    "path": [str(loaded.path)],
                    "architecture": [type(loaded.model).__name__],
                    "n_layers": [len(projections)],
                    "d_mlp": [neuron_count(projections[0])],
                    "n_params": [sum(p.numel() for p in loaded.model.parameters())],
                    "dtype": [subject.dtype],
                }
            ),
            loaded.identity,
            context,
        )
        if len(projections) != n_layers:
            context.log.warning(
                f"the model has {len(projections)} layers but the code location was built for {n_layers}; "
                "set NEURON_ATLAS_MODEL to this model and reload the definitions"
            )
        return Output(
            frame,
            data_version=DataVersion(loaded.identity.data_version),
            metadata={
                "model_id": loaded.identity.model_id,
                "revision": loaded.identity.revision,
                "n_layers": len(projections),
                "d_mlp": neuron_count(projections[0]),
            },
        )

    @asset(
        io_manager_key=WAREHOUSE,
        code_version="1",
        automation_condition=RERUN,
        group_name="atlas",
        backfill_policy=BackfillPolicy.single_run(),
        deps=["corpus_source"],
    )
    def corpus_tokens(
        context: AssetExecutionContext,
        subject_model: pl.DataFrame,
        subject: SubjectModelResource,
        corpus: CorpusResource,
    ) -> pl.DataFrame:
        """The corpus cut into fixed-length sequences: token ids and the strings the explainer sees."""
        tokenizer, identity = subject.load_tokenizer()
        _require_same_model(_identity_of(subject_model), identity)
        frame = tokenize_corpus(tokenizer, corpus.spec())
        context.add_output_metadata(
            {
                "sequences": frame.height,
                "tokens": frame.height * corpus.seq_len,
                "source": corpus.source,
                "preview": _preview(frame, ["seq_id", "text"], 5),
            }
        )
        return _lineage(frame, identity, context)

    @asset(
        io_manager_key=WAREHOUSE,
        code_version="3",  # 2: both directions (bottom, quantile_neg, min/negative stats); 3: 8-bit codes
        automation_condition=RERUN,
        group_name="atlas",
        partitions_def=layers_def,
        backfill_policy=BackfillPolicy.single_run(),
        metadata=LAYER_METADATA,
    )
    def activation_records(
        context: AssetExecutionContext,
        subject_model: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        subject: SubjectModelResource,
        sampling: SamplingResource,
    ) -> pl.DataFrame:
        """Per neuron: statistics plus top, random and quantile records, and for a captured negative
        direction the bottom and negative quantile records. All selected layers are captured in ONE
        forward pass over the corpus, which stops after the deepest of them."""
        layers = _layers(context)
        loaded = subject.load()
        _require_same_model(_identity_of(subject_model), loaded.identity)
        check_layers(loaded.model, layers)
        spec = sampling.spec()
        spec.validate()
        gated = mlp_is_gated(loaded.model)
        negative = spec.captures_negative(gated)
        token_ids = np.asarray(corpus_tokens.sort("seq_id")["token_ids"].to_list(), dtype=np.int64)
        context.log.info(
            f"capturing layers {layers} over {token_ids.shape[0]} sequences of {token_ids.shape[1]} tokens;"
            f" negative direction {'on' if negative else 'off'} (negative={spec.negative!r},"
            f" {'gated' if gated else 'ReLU/GELU'} MLP)"
        )
        step = max(1, token_ids.shape[0] // 10)

        def progress(done: int, total: int, elapsed: float) -> None:
            if done % step < sampling.batch_size or done == total:
                rate = done * token_ids.shape[1] / max(elapsed, 1e-9)
                left = f", about {duration(elapsed / done * (total - done))} left" if done < total else ""
                context.log.info(f"{done}/{total} sequences, {rate:,.0f} tokens/s, {elapsed:.1f}s{left}")

        records = collect_activation_records(
            loaded, token_ids, layers, spec, prefix=prefix_ids(loaded.tokenizer), progress=progress
        )
        frame = pl.concat([records_frame(records[layer]) for layer in layers])
        summary = (
            frame.group_by("layer")
            .agg(
                pl.len().alias("neurons"),
                (pl.col("max_activation") <= 0).sum().alias("dead"),
                pl.col("max_activation").mean().alias("mean_max"),
                pl.col("positive_frac").mean().alias("mean_positive_frac"),
                pl.col("negative_frac").mean().alias("mean_negative_frac"),
            )
            .sort("layer")
        )
        context.add_output_metadata(
            {
                "layers": MetadataValue.text(", ".join(map(str, layers))),
                "negative_captured": negative,
                "per_layer": _preview(summary, summary.columns, rows=len(layers)),
                "preview": _preview(
                    frame, ["layer", "neuron", "max_activation", "min_activation", "mean_activation", "positive_frac"]
                ),
            }
        )
        return _lineage(frame, loaded.identity, context)

    @asset(
        io_manager_key=WAREHOUSE,
        code_version="2",  # 2: records are references to activation_records (8-bit codes there)
        automation_condition=RERUN,
        group_name="atlas",
        partitions_def=layers_def,
        backfill_policy=BackfillPolicy.single_run(),
        metadata=LAYER_METADATA,
    )
    def top_k_examples(
        context: AssetExecutionContext,
        activation_records: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        sampling: SamplingResource,
    ) -> pl.DataFrame:
        """Per neuron: strided train/calibration/valid/test splits, the 0-10 normalization max, top tokens."""
        identity = ModelIdentity(activation_records["model_id"][0], activation_records["model_revision"][0])
        records = activation_records.drop("model_id", "model_revision", "run_id", "code_version", strict=False)
        tokens = corpus_tokens.select("seq_id", "token_ids", "tokens")
        frame = build_top_k_examples(
            records, tokens, n_top_tokens=sampling.n_top_tokens, min_token_count=sampling.min_token_count
        )
        with_tokens = frame.filter(pl.col("top_tokens").list.len() > 0).height
        context.add_output_metadata(
            {
                "neurons": frame.height,
                "neurons_with_top_tokens": with_tokens,
                "preview": _preview(
                    frame.with_columns(
                        pl.col("top_tokens")
                        .list.eval(pl.element().struct.field("token"))
                        .list.head(5)
                        .list.join(" | ")
                        .alias("top_tokens")
                    ),
                    ["layer", "neuron", "max_activation", "top_tokens"],
                ),
            }
        )
        return _lineage(frame, identity, context)

    return [subject_model, corpus_tokens, activation_records, top_k_examples]
