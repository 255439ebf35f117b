"""From activation records to what the explainer and scorer use: one row per unit (layer, neuron,
polarity) with splits, 0-10 levels and top tokens.

A neuron's '+' unit reads its top records (by max); where the negative direction was captured,
its '-' unit reads the bottom records (by min) as its top records, with levels from
relu(-a)/|min| and top tokens by mean -a. Both units share the neuron's random records. Every
record keeps the raw signed activations; `pipeline.core.units.Unit.true` turns them into the unit's
direction.

Splits are strided slices, as in the paper's code: record i of a ranked list goes to split
i mod 4 (train, calibration, valid, test), so every split sees the whole activation range.
The explainer is shown train top records; candidates are chosen on valid, calibrated on
calibration and reported on test (see `pipeline.core.interpret`).

Held-out data is disjoint from what the explainer could have seen: the capture draws random
records among the sequences that are none of the neuron's top or bottom records (and a random
record that is one, from an older capture, is dropped here), so no held-out sequence of any split
or kind is a sequence the explainer of either direction was shown.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.core.records import record_acts
from pipeline.core.units import MAX_LEVEL, NEGATIVE, POSITIVE, SPLITS, normalize

__all__ = ["MAX_LEVEL", "SPLITS", "normalize", "unit_examples"]


def _records_long(activation_records: pl.DataFrame, column: str, kind: str, polarity: str | None) -> pl.DataFrame:
    """The records of one column, one row each, as `kind` records of the given polarity (None: of both)."""
    return (
        record_acts(activation_records, [column])
        .with_columns(pl.lit(kind).alias("kind"), pl.lit(polarity, dtype=pl.String).alias("polarity"))
        .select("layer", "neuron", "polarity", "kind", "rank", "seq_id", "acts")
    )


TOKEN_TYPE = pl.List(
    pl.Struct({"token_id": pl.Int32, "token": pl.String, "mean_activation": pl.Float64, "count": pl.UInt32})
)


def _acts_matrix(frame: pl.DataFrame) -> np.ndarray:
    width = frame["acts"].list.len().max()
    return frame["acts"].cast(pl.Array(pl.Float32, width)).to_numpy()


def _disjoint_random(top: pl.DataFrame, random: pl.DataFrame) -> pl.DataFrame:
    """Random records whose sequence is none of the neuron's top records (of either direction),
    re-ranked in sample order (a uniform sample of the remaining sequences)."""
    return (
        random.join(top.select("layer", "neuron", "seq_id"), on=["layer", "neuron", "seq_id"], how="anti")
        .sort("layer", "neuron", "rank")
        .with_columns((pl.col("rank").cum_count().over("layer", "neuron") - 1).cast(pl.Int16).alias("rank"))
    )


def unit_examples(
    activation_records: pl.DataFrame, corpus_tokens: pl.DataFrame, n_top_tokens: int = 10, min_token_count: int = 2
) -> pl.DataFrame:
    """One row per unit (layer, neuron, polarity): normalization max, its split records, top
    tokens; `polarity` comes last, so tables written before it existed migrate by appending it.
    '-' rows exist for neurons whose negative direction was captured.

    A split record is a reference {kind, split, split_rank, rank, seq_id} to a record of the
    neuron's `top` list (a '+' top record), `bottom` list (a '-' one) or `random` list in
    `activation_records`, whose `sequences` hold its activations; `pipeline.core.units.units_from_frames`
    and the `examples_long` view read them back, the view with the 0-10 levels.

    Top tokens are the token ids with the highest mean activation (in the unit's direction) over
    the train and calibration records (top and random, each sequence once) that occur at least
    `min_token_count` times there (a token seen once is an anecdote, not a pattern) and whose mean
    reaches level 1; held-out splits are never looked at, so the token-space baseline is scored fairly.
    """
    if activation_records.height == 0:
        raise ValueError("no activation records to build examples from")
    if min_token_count < 1:
        raise ValueError(f"min_token_count must be at least 1, got {min_token_count}")
    top = _records_long(activation_records, "top", "top", POSITIVE)
    has_bottom = "bottom" in activation_records.columns
    if has_bottom:
        top = pl.concat([top, _records_long(activation_records, "bottom", "top", NEGATIVE)])
    random = _disjoint_random(top, _records_long(activation_records, "random", "random", None))
    # The unit's scale: its strongest activation in its own direction (max, or -min for '-'). Units
    # come from the records, so a neuron without bottom records has no '-' unit.
    norm_max = (
        top.with_columns(
            pl.when(pl.col("polarity") == POSITIVE)
            .then(pl.col("acts").list.max())
            .otherwise(-pl.col("acts").list.min())
            .cast(pl.Float32)
            .alias("extreme")
        )  # fmt: skip
        .group_by("layer", "neuron", "polarity")
        .agg(pl.col("extreme").max().alias("max_activation"))
    )
    units = activation_records.select("layer", "neuron").join(
        pl.DataFrame({"polarity": [POSITIVE, NEGATIVE] if has_bottom else [POSITIVE]}), how="cross"
    )
    norm_max = units.join(norm_max, on=["layer", "neuron", "polarity"], how="inner", maintain_order="left")
    per_unit = pl.concat(
        [top, random.drop("polarity").join(norm_max.select("layer", "neuron", "polarity"), on=["layer", "neuron"])],
        how="diagonal_relaxed",
    )
    records = per_unit.join(norm_max, on=["layer", "neuron", "polarity"]).with_columns(
        pl.col("rank").cast(pl.Int32),
        split=pl.lit(pl.Series(SPLITS)).get(pl.col("rank") % len(SPLITS)),
        split_rank=(pl.col("rank") // len(SPLITS)).cast(pl.Int16),
    )
    sign = np.where(records["polarity"].to_numpy() == NEGATIVE, -1.0, 1.0)[:, None]
    acts = _acts_matrix(records) * sign  # in each unit's direction
    keys = ["layer", "neuron", "polarity"]
    nested = (
        records.sort([*keys, "kind", "rank"], descending=[False, False, False, True, False])  # top first
        .group_by(keys, maintain_order=True)
        .agg(pl.struct("kind", "split", "split_rank", "rank", "seq_id").alias("records"))
    )
    return (
        norm_max.join(nested, on=keys, how="left", maintain_order="left")
        .join(
            _top_tokens(records, acts, corpus_tokens, n_top_tokens, min_token_count),
            on=keys,
            how="left",
            maintain_order="left",
        )
        .with_columns(pl.col("top_tokens").fill_null(pl.lit([], dtype=TOKEN_TYPE)))
        .select("layer", "neuron", "max_activation", "records", "top_tokens", "polarity")
    )


def _top_tokens(
    records: pl.DataFrame, acts: np.ndarray, corpus_tokens: pl.DataFrame, n: int, min_count: int
) -> pl.DataFrame:
    """Per unit, the n token ids with the highest mean activation (`acts`: in the unit's direction)
    over its train+calibration records."""
    width = acts.shape[1]
    corpus = corpus_tokens.sort("seq_id")
    token_matrix = corpus["token_ids"].cast(pl.Array(pl.Int32, width)).to_numpy()
    row_of_seq = {seq: row for row, seq in enumerate(corpus["seq_id"].to_list())}
    strings = dict(zip(corpus["token_ids"].explode().to_list(), corpus["tokens"].explode().to_list(), strict=True))
    visible = (
        records.with_row_index("row")
        .filter(pl.col("split").is_in(["train", "calibration"]))
        .unique(["layer", "neuron", "polarity", "seq_id"], keep="first", maintain_order=True)
    )
    flat = pl.DataFrame(
        {
            "layer": np.repeat(visible["layer"].to_numpy(), width),
            "neuron": np.repeat(visible["neuron"].to_numpy(), width),
            "polarity": np.repeat(visible["polarity"].to_numpy(), width),
            "max_activation": np.repeat(visible["max_activation"].to_numpy(), width),
            "token_id": token_matrix[[row_of_seq[s] for s in visible["seq_id"].to_list()]].reshape(-1),
            "act": acts[visible["row"].to_numpy()].reshape(-1).astype(np.float64),
        }
    )
    ranked = (
        flat.group_by("layer", "neuron", "polarity", "token_id")
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
        .sort(
            ["layer", "neuron", "polarity", "mean_activation", "count", "token_id"],
            descending=[False, False, False, True, True, False],
        )
        .group_by("layer", "neuron", "polarity", maintain_order=True)
        .head(n)
        .with_columns(pl.col("token_id").replace_strict(strings, return_dtype=pl.String).alias("token"))
    )
    return (
        ranked.group_by("layer", "neuron", "polarity", maintain_order=True)
        .agg(pl.struct("token_id", "token", "mean_activation", "count").alias("top_tokens"))
        .cast({"layer": pl.Int32, "neuron": pl.Int32, "top_tokens": TOKEN_TYPE})
    )
