"""Splits, 0-10 levels and top tokens on hand-made records with known answers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.core.errors import AtlasInputError
from pipeline.core.examples import normalize, unit_examples
from pipeline.core.units import units_from_frames


def test_normalize_hand_values() -> None:
    acts = np.array([-1.0, 0.0, 0.05, 0.1, 0.25, 0.999, 1.0, 1.5])
    assert normalize(acts, 1.0).tolist() == [0, 0, 0, 1, 2, 9, 10, 10]
    assert normalize(acts, 0.0).tolist() == [0] * 8  # dead neuron: all zeros, no NaN
    assert normalize(acts, -2.0).tolist() == [0] * 8


def _records(k: int, t: int = 3) -> pl.DataFrame:
    """One neuron whose top record r (sequence r) has activations (k - r) on token 7 and 0 elsewhere
    (code 255 is the sequence's max, 0 its min); random records (sequences k..2k-1) are all zero."""
    rec = pl.Struct({"rank": pl.Int16, "seq_id": pl.Int32})
    seq = pl.Struct({"seq_id": pl.Int32, "max_act": pl.Float32, "min_act": pl.Float32, "codes": pl.List(pl.UInt8)})
    top = [{"rank": r, "seq_id": r} for r in range(k)]
    rand = [{"rank": r, "seq_id": k + r} for r in range(k)]
    sequences = [
        {"seq_id": r, "max_act": float(k - r), "min_act": 0.0, "codes": [255] + [0] * (t - 1)} for r in range(k)
    ]
    sequences += [{"seq_id": k + r, "max_act": 0.0, "min_act": 0.0, "codes": [0] * t} for r in range(k)]
    return pl.DataFrame(
        {"layer": [2], "neuron": [5], "top": [top], "random": [rand], "sequences": [sequences]},
        schema={
            "layer": pl.Int32,
            "neuron": pl.Int32,
            "top": pl.List(rec),
            "random": pl.List(rec),
            "sequences": pl.List(seq),
        },
    )


def _corpus(n: int, t: int = 3) -> pl.DataFrame:
    ids = [[7] + [1] * (t - 1) for _ in range(n)]
    return pl.DataFrame({"seq_id": list(range(n)), "token_ids": ids, "tokens": [["x"] + ["y"] * (t - 1)] * n})


def test_strided_splits_and_levels() -> None:
    records, corpus = _records(8), _corpus(16)
    out = unit_examples(records, corpus)
    row = out.row(0, named=True)
    assert row["max_activation"] == 8.0
    top = [r for r in row["records"] if r["kind"] == "top"]
    by_split = {s: [r["seq_id"] for r in top if r["split"] == s] for s in ("train", "calibration", "valid", "test")}
    assert by_split == {"train": [0, 4], "calibration": [1, 5], "valid": [2, 6], "test": [3, 7]}
    assert row["records"][0]["kind"] == "top"
    # The records are references: their activations and levels come back from activation_records.
    unit = units_from_frames(out, corpus, records)[(2, 5, "+")]
    tops = sorted((e for e in unit.examples if e.kind == "top"), key=lambda e: e.seq_id)
    assert [e.acts.tolist() for e in tops] == [[8.0 - r, 0.0, 0.0] for r in range(8)]
    assert [int(unit.levels(e)[0]) for e in tops] == [10, 8, 7, 6, 5, 3, 2, 1]  # floor(10 * (8 - r) / 8)


def test_top_tokens_use_train_and_calibration_only() -> None:
    row = unit_examples(_records(8), _corpus(16), n_top_tokens=5).row(0, named=True)
    # token 7 appears in train+calibration top records 0, 1, 4, 5 (acts 8, 7, 4, 3) and in 4 random
    # records with activation 0: mean = 22 / 8
    assert row["top_tokens"] == [{"token_id": 7, "token": "x", "mean_activation": 22 / 8, "count": 8}]


def test_random_records_that_are_top_records_are_dropped_before_splitting() -> None:
    records = _records(8)
    # Make random records 1 and 4 the same sequences as top records 6 and 0.
    rand = records["random"][0].to_list()
    rand[1]["seq_id"], rand[4]["seq_id"] = 6, 0
    records = records.with_columns(pl.Series("random", [rand], dtype=records.schema["random"]))
    row = unit_examples(records, _corpus(16)).row(0, named=True)
    random = [r for r in row["records"] if r["kind"] == "random"]
    top_ids = {r["seq_id"] for r in row["records"] if r["kind"] == "top"}
    assert [r["seq_id"] for r in random] == [8, 10, 11, 13, 14, 15]  # sample order kept, 9 and 12 gone
    assert [r["rank"] for r in random] == list(range(6))  # re-ranked, then strided
    assert [r["split"] for r in random] == ["train", "calibration", "valid", "test", "train", "calibration"]
    assert not top_ids & {r["seq_id"] for r in random}


def test_a_top_token_needs_the_minimum_count() -> None:
    corpus = _corpus(16)
    # Token 9 appears once (in top record 0, the strongest): a one-off, dropped at min count 2.
    ids = corpus["token_ids"].to_list()
    ids[0] = [9, 1, 1]
    corpus = corpus.with_columns(
        pl.Series("token_ids", ids), pl.Series("tokens", [["z", "y", "y"]] + [["x", "y", "y"]] * 15)
    )
    row = unit_examples(_records(8), corpus, n_top_tokens=5).row(0, named=True)
    assert [t["token_id"] for t in row["top_tokens"]] == [7]
    once = unit_examples(_records(8), corpus, n_top_tokens=5, min_token_count=1).row(0, named=True)
    assert [t["token_id"] for t in once["top_tokens"]] == [9, 7]  # mean 8 beats 7's (7 + 4 + 3) / 7


def test_a_listed_sequence_without_activations_is_a_clear_error() -> None:
    """The lists refer to `sequences` by seq_id: a listed sequence missing there is refused, not dropped."""
    records = _records(4)
    kept = [s for s in records["sequences"][0].to_list() if s["seq_id"] != 2]
    records = records.with_columns(pl.Series("sequences", [kept], dtype=records.schema["sequences"]))
    with pytest.raises(AtlasInputError, match="neuron 5 lists sequence 2 .top. without its activations"):
        unit_examples(records, _corpus(8))
