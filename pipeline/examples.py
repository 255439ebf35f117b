"""From activation records to what the explainer and scorer use: splits, 0-10 levels, top tokens.

Splits are strided slices, as in the paper's code: record i of a ranked list goes to split
i mod 4 (train, calibration, valid, test), so every split sees the whole activation range.
The explainer is shown train top records; candidates are chosen on valid, calibrated on
calibration and reported on test (see `pipeline.interpret`).

Held-out data is disjoint from what the explainer could have seen: a random record whose sequence
is one of the unit's top records is dropped before the random records are split, so no held-out
sequence of any split or kind is a top record's sequence.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.units import MAX_LEVEL, SPLITS, normalize

__all__ = ["MAX_LEVEL", "SPLITS", "normalize", "top_k_examples"]


def _records_long(activation_records: pl.DataFrame, kind: str) -> pl.DataFrame:
    return (
        activation_records.select("layer", "neuron", kind)
        .explode(kind)
        .drop_nulls(kind)
        .unnest(kind)
        .with_columns(pl.lit(kind).alias("kind"))
        .select("layer", "neuron", "kind", "rank", "seq_id", "max_act", "acts")
    )


TOKEN_TYPE = pl.List(
    pl.Struct({"token_id": pl.Int32, "token": pl.String, "mean_activation": pl.Float64, "count": pl.UInt32})
)


def _acts_matrix(frame: pl.DataFrame) -> np.ndarray:
    width = frame["acts"].list.len().max()
    return frame["acts"].cast(pl.Array(pl.Float32, width)).to_numpy()


def _disjoint_random(top: pl.DataFrame, random: pl.DataFrame) -> pl.DataFrame:
    """Random records whose sequence is not one of the unit's top records, re-ranked in sample order
    (a uniform sample of the remaining sequences)."""
    return (
        random.join(top.select("layer", "neuron", "seq_id"), on=["layer", "neuron", "seq_id"], how="anti")
        .sort("layer", "neuron", "rank")
        .with_columns((pl.col("rank").cum_count().over("layer", "neuron") - 1).cast(pl.Int16).alias("rank"))
    )


def top_k_examples(
    activation_records: pl.DataFrame, corpus_tokens: pl.DataFrame, n_top_tokens: int = 10, min_token_count: int = 2
) -> pl.DataFrame:
    """One row per (layer, neuron): normalization max, split records with 0-10 levels, top tokens.

    Top tokens are the token ids with the highest mean activation over the train and calibration
    records (top and random, each sequence once) that occur at least `min_token_count` times there
    (a token seen once is an anecdote, not a pattern) and whose mean reaches level 1; held-out
    splits are never looked at, so the token-space baseline is scored fairly.
    """
    if activation_records.height == 0:
        raise ValueError("no activation records to build examples from")
    if min_token_count < 1:
        raise ValueError(f"min_token_count must be at least 1, got {min_token_count}")
    top = _records_long(activation_records, "top")
    records = pl.concat([top, _disjoint_random(top, _records_long(activation_records, "random"))])
    norm_max = activation_records.select(
        "layer",
        "neuron",
        pl.col("top").list.eval(pl.element().struct.field("max_act")).list.max().alias("max_activation"),
    )
    records = records.join(norm_max, on=["layer", "neuron"]).with_columns(
        pl.col("rank").cast(pl.Int32),
        split=pl.lit(pl.Series(SPLITS)).get(pl.col("rank") % len(SPLITS)),
        split_rank=(pl.col("rank") // len(SPLITS)).cast(pl.Int16),
    )
    acts = _acts_matrix(records)
    levels = normalize(acts, records["max_activation"].to_numpy())
    records = records.with_columns(
        pl.Series("levels", levels, dtype=pl.Array(pl.UInt8, acts.shape[1])).cast(pl.List(pl.UInt8))
    )
    nested = (
        records.sort(["layer", "neuron", "kind", "rank"], descending=[False, False, True, False])  # top first
        .group_by(["layer", "neuron"], maintain_order=True)
        .agg(pl.struct("kind", "split", "split_rank", "rank", "seq_id", "max_act", "acts", "levels").alias("records"))
    )
    return (
        norm_max.join(nested, on=["layer", "neuron"], how="left", maintain_order="left")
        .join(
            _top_tokens(records, acts, corpus_tokens, n_top_tokens, min_token_count),
            on=["layer", "neuron"],
            how="left",
            maintain_order="left",
        )
        .with_columns(pl.col("top_tokens").fill_null(pl.lit([], dtype=TOKEN_TYPE)))
    )


def _top_tokens(
    records: pl.DataFrame, acts: np.ndarray, corpus_tokens: pl.DataFrame, n: int, min_count: int
) -> pl.DataFrame:
    """Per neuron, the n token ids with the highest mean activation over its train+calibration records."""
    width = acts.shape[1]
    corpus = corpus_tokens.sort("seq_id")
    token_matrix = corpus["token_ids"].cast(pl.Array(pl.Int32, width)).to_numpy()
    row_of_seq = {seq: row for row, seq in enumerate(corpus["seq_id"].to_list())}
    strings = dict(zip(corpus["token_ids"].explode().to_list(), corpus["tokens"].explode().to_list(), strict=True))
    visible = (
        records.with_row_index("row")
        .filter(pl.col("split").is_in(["train", "calibration"]))
        .unique(["layer", "neuron", "seq_id"], keep="first", maintain_order=True)
    )
    flat = pl.DataFrame(
        {
            "layer": np.repeat(visible["layer"].to_numpy(), width),
            "neuron": np.repeat(visible["neuron"].to_numpy(), width),
            "max_activation": np.repeat(visible["max_activation"].to_numpy(), width),
            "token_id": token_matrix[[row_of_seq[s] for s in visible["seq_id"].to_list()]].reshape(-1),
            "act": acts[visible["row"].to_numpy()].reshape(-1).astype(np.float64),
        }
    )
    ranked = (
        flat.group_by("layer", "neuron", "token_id")
        .agg(
            pl.col("act").mean().alias("mean_activation"),
            pl.len().cast(pl.UInt32).alias("count"),
            pl.col("max_activation").first(),
        )
        .filter(
            (pl.col("max_activation") > 0)
            & (pl.col("mean_activation") >= pl.col("max_activation") / MAX_LEVEL)
            & (pl.col("count") >= min_count)
        )
        .sort(["layer", "neuron", "mean_activation", "count", "token_id"], descending=[False, False, True, True, False])
        .group_by("layer", "neuron", maintain_order=True)
        .head(n)
        .with_columns(pl.col("token_id").replace_strict(strings, return_dtype=pl.String).alias("token"))
    )
    return (
        ranked.group_by("layer", "neuron", maintain_order=True)
        .agg(pl.struct("token_id", "token", "mean_activation", "count").alias("top_tokens"))
        .cast({"layer": pl.Int32, "neuron": pl.Int32, "top_tokens": TOKEN_TYPE})
    )
