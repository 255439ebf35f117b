"""The unit of interpretation and the examples it is explained and scored on.

A unit is one direction of one neuron: (layer, neuron, polarity). Polarity '+' reads the neuron
as it is; '-' reads its negation, for MLPs whose neurons fire both ways. Every example keeps the
neuron's raw (signed) activations; `Unit.true` turns them into the unit's direction, which is what
levels, explanations and scores see. Where the neuron's two directions are both units, each is
rectified (relu of the direction): the other side is the other unit's to explain, so neither is
scored on behaviour it was never shown. A neuron with one unit keeps its raw activations (the
paper's practice for GELU's small negatives).

A unit's examples are its top records and a random sample, each strided over the splits: the
explainer sees train top records, candidates are chosen on valid, the chosen one is calibrated on
calibration and reported on test. Held-out splits never contain a top record's sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipeline.core.errors import AtlasInputError
from pipeline.core.frames import Int32, Str, schema_of

POSITIVE, NEGATIVE = "+", "-"
SPLITS = ("train", "calibration", "valid", "test")
HELD_OUT = ("calibration", "valid", "test")
MAX_LEVEL = 10
UnitKey = tuple[int, int, str]  # (layer, neuron, polarity)


def normalize(acts: np.ndarray, max_activation: np.ndarray | float) -> np.ndarray:
    """The paper's 0-10 levels: min(10, floor(10 * relu(a) / max)); all zeros where max <= 0."""
    acts = np.asarray(acts, dtype=np.float64)
    m = np.asarray(max_activation, dtype=np.float64)
    m = m.reshape(m.shape + (1,) * (acts.ndim - m.ndim))
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.floor(MAX_LEVEL * np.maximum(acts, 0.0) / m)
    levels = np.where(m > 0, levels, 0.0)
    return np.clip(levels, 0, MAX_LEVEL).astype(np.uint8)


@dataclass(frozen=True)
class Example:
    """One sequence of a unit: its tokens and the neuron's raw activation at each."""

    kind: str  # 'top' (among the unit's strongest sequences) or 'random'
    split: str
    split_rank: int
    seq_id: int
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    acts: np.ndarray  # float32, signed, one per token
    start: int = 0  # where `tokens` begin in the sequence (a window of it; 0 for a whole sequence)

    def window(self, start: int, width: int) -> Example:
        """Tokens [start, start + width) of this sequence, as an example of its own."""
        end = min(len(self.tokens), start + width)
        return dataclasses.replace(
            self,
            tokens=self.tokens[start:end],
            token_ids=self.token_ids[start:end],
            acts=self.acts[start:end],
            start=self.start + start,
        )


@dataclass(frozen=True)
class Unit:
    layer: Int32
    neuron: Int32
    polarity: Str
    max_activation: float  # strongest activation in the unit's direction: the 0-10 scale's top
    examples: tuple[Example, ...]
    top_tokens: tuple[Mapping[str, Any], ...]
    rectified: bool = False  # the neuron's other direction is a unit of its own

    @property
    def key(self) -> UnitKey:
        return (self.layer, self.neuron, self.polarity)

    @property
    def sign(self) -> float:
        return -1.0 if self.polarity == NEGATIVE else 1.0

    @property
    def dead(self) -> bool:
        """Never active in this direction: nothing to explain."""
        return not self.max_activation > 0

    def split(self, name: str, kind: str | None = None) -> list[Example]:
        """The split's examples, top records first, each kind in split-rank order."""
        return [e for e in self.examples if e.split == name and (kind is None or e.kind == kind)]

    def true(self, example: Example) -> np.ndarray:
        """Activations in the unit's direction (what is explained and scored)."""
        directed = self.sign * np.asarray(example.acts, dtype=np.float64)
        return np.maximum(directed, 0.0) if self.rectified else directed

    def other(self, example: Example) -> np.ndarray:
        """The part of the raw activations that is not this unit's (zero unless rectified)."""
        return np.asarray(example.acts, dtype=np.float64) - self.sign * self.true(example)

    def levels(self, example: Example) -> np.ndarray:
        return normalize(self.true(example), self.max_activation)

    def train_records(self, n: int = 5) -> list[list[tuple[str, int]]]:
        """What the explainer is shown: up to n train top records as (token, level) pairs."""
        return [
            list(zip(e.tokens, (int(v) for v in self.levels(e)), strict=True)) for e in self.split("train", "top")[:n]
        ]


UNIT_KEY = ["layer", "neuron", "polarity"]
UNIT_SCHEMA = schema_of(Unit, UNIT_KEY)  # the key columns every per-unit table starts with


def units_from_frames(
    examples: pl.DataFrame, corpus_tokens: pl.DataFrame, activation_records: pl.DataFrame
) -> dict[UnitKey, Unit]:
    """One `Unit` per row of `unit_examples` (rows written before polarity existed read as '+'),
    its records' activations read from `activation_records` (`RECORD_COLUMNS`), where
    `pipeline.core.examples.unit_examples` says they are."""
    wanted = {int(s) for recs in examples["records"].to_list() for r in recs or [] for s in [r["seq_id"]]}
    tokens = {
        row["seq_id"]: (tuple(row["tokens"]), tuple(row["token_ids"]))
        for row in corpus_tokens.select("seq_id", "tokens", "token_ids")
        .filter(pl.col("seq_id").is_in(sorted(wanted)))
        .iter_rows(named=True)
    }
    acts = _record_acts(activation_records, examples.select("layer", "neuron").unique())
    has_polarity = "polarity" in examples.columns
    polarity_of = (lambda row: row["polarity"] or POSITIVE) if has_polarity else (lambda row: POSITIVE)
    two_way = {(r["layer"], r["neuron"]) for r in examples.iter_rows(named=True) if polarity_of(r) == NEGATIVE}
    out: dict[UnitKey, Unit] = {}
    for row in examples.iter_rows(named=True):
        layer, neuron, polarity = int(row["layer"]), int(row["neuron"]), polarity_of(row)
        records = sorted(row["records"] or [], key=lambda r: (r["kind"] != "top", SPLITS.index(r["split"]), r["rank"]))
        try:
            examples_of = tuple(
                Example(
                    r["kind"],
                    r["split"],
                    int(r["split_rank"]),
                    int(r["seq_id"]),
                    *tokens[r["seq_id"]],
                    acts[(layer, neuron, source_list(r["kind"], polarity), int(r["seq_id"]))],
                )
                for r in records
            )
        except KeyError as missing:
            raise AtlasInputError(
                f"unit ({layer}, {neuron}, {polarity}): record {missing} is not in activation_records or"
                " corpus_tokens: materialize activation_records and unit_examples of the layer again"
            ) from None
        unit = Unit(
            layer=layer,
            neuron=neuron,
            polarity=polarity,
            max_activation=float(row["max_activation"]),
            examples=examples_of,
            top_tokens=tuple(row["top_tokens"] or ()),
            rectified=(row["layer"], row["neuron"]) in two_way,
        )
        out[unit.key] = unit
    return out


RECORD_LISTS = ("top", "bottom", "random")  # the activation_records lists a unit's examples come from
RECORD_COLUMNS = ["layer", "neuron", *RECORD_LISTS, "sequences"]  # what units_from_frames reads of them


def source_list(kind: str, polarity: str) -> str:
    """The `activation_records` list holding a unit's record of this kind."""
    if kind == "random":
        return "random"
    return "bottom" if polarity == NEGATIVE else "top"


def _record_acts(
    activation_records: pl.DataFrame, neurons: pl.DataFrame
) -> dict[tuple[int, int, str, int], np.ndarray]:
    """(layer, neuron, list, seq_id) -> float32 activations, for the given neurons' top, bottom and
    random records."""
    from pipeline.core.records import record_acts  # here: that module imports torch, which units' readers need not

    chosen = activation_records.join(neurons, on=["layer", "neuron"], how="semi")
    long = record_acts(chosen, RECORD_LISTS)
    if long.height == 0:
        return {}
    matrix = long["acts"].cast(pl.Array(pl.Float32, long["acts"].list.len().max())).to_numpy()
    matrix.setflags(write=False)  # rows are shared by a neuron's two units (its random records)
    return dict(zip(long.select("layer", "neuron", "kind", "seq_id").iter_rows(), matrix, strict=True))


def select_units(
    units: Mapping[UnitKey, Unit], layer: int, n_neurons: int, limit: int | None, ids: Sequence[int] | None
) -> list[Unit]:
    """Every direction of the chosen neurons of a layer: explicit ids (checked), else the first `limit`."""
    neurons = select_neurons(n_neurons, limit, ids)
    chosen = set(neurons)
    return sorted((u for u in units.values() if u.layer == layer and u.neuron in chosen), key=_order)


def select_neurons(n_neurons: int, limit: int | None, ids: Sequence[int] | None) -> list[int]:
    """Explicit ids (checked), else the first `limit` neurons (all when limit is None)."""
    if ids:
        bad = [i for i in ids if not 0 <= i < n_neurons]
        if bad:
            raise ValueError(f"neuron ids {bad} out of range: the layer has {n_neurons} neurons")
        return sorted(set(ids))
    if limit is not None and limit < 1:
        raise ValueError(f"the number of neurons to explain must be at least 1, got {limit}")
    return list(range(n_neurons if limit is None else min(limit, n_neurons)))


def _order(unit: Unit) -> tuple[int, str, int]:
    return (unit.layer, unit.polarity, unit.neuron)


def derangement(keys: Iterable[UnitKey]) -> dict[UnitKey, UnitKey]:
    """A fixed derangement of a layer's units, for the mismatched-explanation control: each unit
    is paired with the next one of the same layer in (polarity, neuron) order, cyclically, so a
    neuron's two directions are never each other's control unless the layer has only them."""
    by_layer: dict[int, list[UnitKey]] = {}
    for key in sorted(set(keys), key=lambda k: (k[0], k[2], k[1])):
        by_layer.setdefault(key[0], []).append(key)
    out: dict[UnitKey, UnitKey] = {}
    for members in by_layer.values():
        if len(members) < 2:
            continue
        for i, key in enumerate(members):
            out[key] = members[(i + 1) % len(members)]
    return out
