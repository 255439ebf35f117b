"""The stage assets. Each is a thin call into `pipeline`, plus lineage columns and metadata."""
# No `from __future__ import annotations` here: Dagster inspects the real annotation objects.

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    DataVersion,
    MetadataValue,
    Output,
    asset,
)

from assets.common import (
    atlas_asset_args,
    identity_of,
    layer_partitions,
    partition_layers,
    preview,
    require_same_model,
    strip_lineage,
    versioned_output,
    with_lineage,
)
from assets.config import SamplingConfig, TopTokensConfig, refuse_moved_knobs
from assets.resources import CorpusResource, SubjectModelResource
from pipeline.core.corpus import prefix_ids, tokenize_corpus
from pipeline.core.examples import unit_examples as build_unit_examples
from pipeline.core.mlp import check_layers, mlp_is_gated, mlp_projections, neuron_count
from pipeline.core.progress import duration
from pipeline.core.records import collect_activation_records, records_frame


def build_stage_assets(n_layers: int) -> list[AssetsDefinition]:
    """The stage assets, with one layer partition per layer of the configured model."""
    layers_def = layer_partitions(n_layers)

    @asset(code_version="1", deps=["model_checkpoint"], **atlas_asset_args())
    def subject_model(context: AssetExecutionContext, subject: SubjectModelResource) -> Output[pl.DataFrame]:
        """The subject model: loaded (converted once if embedded) and identified by revision or hash."""
        loaded = subject.load()
        projections = mlp_projections(loaded.model)
        frame = with_lineage(
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

    @asset(code_version="1", deps=["corpus_source"], **atlas_asset_args())
    def corpus_tokens(
        context: AssetExecutionContext,
        subject_model: pl.DataFrame,
        subject: SubjectModelResource,
        corpus: CorpusResource,
    ) -> Output[pl.DataFrame]:
        """The corpus cut into fixed-length sequences: token ids and the strings the explainer sees."""
        tokenizer, identity = subject.load_tokenizer()
        require_same_model(identity_of(subject_model), identity)
        frame = tokenize_corpus(tokenizer, corpus.spec())
        context.add_output_metadata(
            {
                "sequences": frame.height,
                "tokens": frame.height * corpus.seq_len,
                "source": corpus.source,
                "preview": preview(frame, ["seq_id", "text"], 5),
            }
        )
        return versioned_output(frame, identity, context)

    @asset(
        code_version="3",  # 2: both directions (bottom, quantile_neg, min/negative stats); 3: 8-bit codes
        **atlas_asset_args(layers_def),
    )
    def activation_records(
        context: AssetExecutionContext,
        subject_model: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        subject: SubjectModelResource,
        config: SamplingConfig,
    ) -> Output[pl.DataFrame]:
        """Per neuron: statistics plus top, random and quantile records, and for a captured negative
        direction the bottom and negative quantile records. All selected layers are captured in ONE
        forward pass over the corpus, which stops after the deepest of them."""
        refuse_moved_knobs(context)
        layers = partition_layers(context)
        loaded = subject.load()
        require_same_model(identity_of(subject_model), loaded.identity)
        check_layers(loaded.model, layers)
        spec = config.spec()
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
            if done % step < config.batch_size or done == total:
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
                "per_layer": preview(summary, summary.columns, rows=len(layers)),
                "preview": preview(
                    frame, ["layer", "neuron", "max_activation", "min_activation", "mean_activation", "positive_frac"]
                ),
            }
        )
        return versioned_output(frame, loaded.identity, context)

    @asset(
        code_version="2",  # 2: records are references to activation_records (8-bit codes there)
        **atlas_asset_args(layers_def),
    )
    def unit_examples(
        context: AssetExecutionContext,
        activation_records: pl.DataFrame,
        corpus_tokens: pl.DataFrame,
        config: TopTokensConfig,
    ) -> Output[pl.DataFrame]:
        """Per neuron: strided train/calibration/valid/test splits, the 0-10 normalization max, top tokens."""
        refuse_moved_knobs(context)
        identity = identity_of(activation_records)
        records = strip_lineage(activation_records)
        tokens = corpus_tokens.select("seq_id", "token_ids", "tokens")
        frame = build_unit_examples(
            records, tokens, n_top_tokens=config.n_top_tokens, min_token_count=config.min_token_count
        )
        with_tokens = frame.filter(pl.col("top_tokens").list.len() > 0).height
        context.add_output_metadata(
            {
                "neurons": frame.height,
                "neurons_with_top_tokens": with_tokens,
                "preview": preview(
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
        return versioned_output(frame, identity, context)

    return [subject_model, corpus_tokens, activation_records, unit_examples]
