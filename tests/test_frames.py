"""Column dtypes are read off the typed records (`pipeline.core.frames.schema_of`)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pytest

from pipeline.core.frames import Float64, Int16, Str, schema_of
from pipeline.core.interpret import SCORE_SCHEMA
from pipeline.core.scoring import SplitScores
from pipeline.core.units import UNIT_SCHEMA


@dataclass
class _Row:
    n: Int16
    score: Float64 | None
    why: Str | None


@dataclass
class _Untyped:
    n: int


def test_dtypes_come_from_the_annotations() -> None:
    assert schema_of(_Row) == {"n": pl.Int16, "score": pl.Float64, "why": pl.String}
    assert list(schema_of(_Row, ["why", "n"])) == ["why", "n"]
    frame = pl.DataFrame([{"n": 3, "score": None, "why": "none"}], schema=schema_of(_Row))
    assert frame.schema == pl.Schema({"n": pl.Int16, "score": pl.Float64, "why": pl.String})


def test_a_plain_annotation_or_unknown_name_is_refused() -> None:
    with pytest.raises(TypeError, match=r"_Untyped\.n"):
        schema_of(_Untyped)
    with pytest.raises(KeyError, match="nope"):
        schema_of(_Row, ["nope"])


def test_tables_carry_the_records_columns() -> None:
    assert UNIT_SCHEMA == {"layer": pl.Int32, "neuron": pl.Int32, "polarity": pl.String}
    split_scores = schema_of(SplitScores)
    assert {k: SCORE_SCHEMA[k] for k in split_scores} == split_scores
    assert split_scores["corr_all"] == pl.Float64 and split_scores["n_tokens"] == pl.Int32
