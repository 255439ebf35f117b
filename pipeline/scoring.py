"""The paper's explanation scores, over all held-out sequences concatenated.

Correlation is scale-free, so it compares raw activations with simulated levels. r² and
absolute-deviation explained are not: they compare the simulated expected levels with the true
activations put on the same 0-10 scale (10·relu(a)/max, not floored, clipped at 10), so a
perfect simulation scores 1. Undefined scores are None with a reason, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ZERO_TRUE = "constant true activations (dead or constant neuron)"
ZERO_PRED = "constant simulation"


@dataclass(frozen=True)
class ScoreResult:
    value: float | None
    reason: str | None = None


def _concat(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | str:
    if len(true) != len(pred) or any(len(t) != len(p) for t, p in zip(true, pred, strict=False)):
        raise ValueError("true and simulated sequences differ in number or length")
    if not true or sum(len(t) for t in true) == 0:
        return "no held-out tokens"
    t = np.concatenate([np.asarray(x, dtype=np.float64) for x in true])
    p = np.concatenate([np.asarray(x, dtype=np.float64) for x in pred])
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        return "non-finite activations or simulation"
    return t, p


def correlation(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> ScoreResult:
    """Pearson correlation of the concatenation (not the mean of per-sequence correlations)."""
    both = _concat(true, pred)
    if isinstance(both, str):
        return ScoreResult(None, both)
    t, p = both
    tc, pc = t - t.mean(), p - p.mean()
    tn, pn = np.sqrt((tc * tc).sum()), np.sqrt((pc * pc).sum())
    if tn <= 1e-12 * max(1.0, np.abs(t).max()):
        return ScoreResult(None, ZERO_TRUE)
    if pn <= 1e-12 * max(1.0, np.abs(p).max()):
        return ScoreResult(None, ZERO_PRED)
    return ScoreResult(float(np.clip((tc * pc).sum() / (tn * pn), -1.0, 1.0)))


def r_squared(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> ScoreResult:
    """1 − mean((t−p)²) / mean(t²)."""
    both = _concat(true, pred)
    if isinstance(both, str):
        return ScoreResult(None, both)
    t, p = both
    denom = float((t * t).mean())
    if denom == 0:
        return ScoreResult(None, "true activations are all zero")
    return ScoreResult(1.0 - float(((t - p) ** 2).mean()) / denom)


def absolute_dev_explained(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> ScoreResult:
    """1 − mean|t−p| / mean|t|."""
    both = _concat(true, pred)
    if isinstance(both, str):
        return ScoreResult(None, both)
    t, p = both
    denom = float(np.abs(t).mean())
    if denom == 0:
        return ScoreResult(None, "true activations are all zero")
    return ScoreResult(1.0 - float(np.abs(t - p).mean()) / denom)


def to_level_scale(acts: np.ndarray, max_activation: float) -> np.ndarray:
    """True activations on the simulator's 0-10 scale, unfloored: clip(10·relu(a)/max, 0, 10)."""
    acts = np.asarray(acts, dtype=np.float64)
    if not max_activation > 0:
        return np.zeros_like(acts)
    return np.clip(10.0 * np.maximum(acts, 0.0) / max_activation, 0.0, 10.0)


@dataclass(frozen=True)
class NeuronScores:
    corr_all: float | None
    corr_all_reason: str | None
    corr_top: float | None
    corr_top_reason: str | None
    corr_random: float | None
    corr_random_reason: str | None
    r2_all: float | None
    r2_all_reason: str | None
    absdev_all: float | None
    absdev_all_reason: str | None
    n_sequences: int
    n_tokens: int


def score_neuron(
    top_true: Sequence[np.ndarray],
    top_pred: Sequence[np.ndarray],
    random_true: Sequence[np.ndarray],
    random_pred: Sequence[np.ndarray],
    max_activation: float,
) -> NeuronScores:
    """All scores of one explanation: top+random ("all"), top-only and random-only."""
    all_true, all_pred = [*top_true, *random_true], [*top_pred, *random_pred]
    levels = [to_level_scale(t, max_activation) for t in all_true]
    corr_all, corr_top, corr_random = (
        correlation(all_true, all_pred),
        correlation(top_true, top_pred),
        correlation(random_true, random_pred),
    )
    r2, absdev = r_squared(levels, all_pred), absolute_dev_explained(levels, all_pred)
    return NeuronScores(
        corr_all.value,
        corr_all.reason,
        corr_top.value,
        corr_top.reason,
        corr_random.value,
        corr_random.reason,
        r2.value,
        r2.reason,
        absdev.value,
        absdev.reason,
        n_sequences=len(all_true),
        n_tokens=int(sum(len(t) for t in all_true)),
    )
