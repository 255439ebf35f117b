"""The paper's explanation scores, calibration, and the control that says whether they mean anything.

Scores are computed over all sequences of a split concatenated (not averaged per sequence):
- correlation of the unit's true activations with the simulated expected levels (scale-free, so
  it compares the two directly: the paper's `ev_correlation_score`);
- r² and absolute-deviation explained on the CALIBRATED simulation in activation space: the levels
  mapped by a least-squares line fitted on the calibration split, as the reference's
  `LinearCalibratedNeuronSimulator` does, so a perfect simulation at any scale or offset scores 1.
Undefined scores are None with a reason, never NaN.

A score alone says nothing about the simulator: `discrimination` compares each unit's score with
its control, the same sequences simulated from another unit's explanation.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.frames import Float64, Int32, Str

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


@dataclass(frozen=True)
class Calibration:
    """activation ≈ slope · level + intercept, fitted on the calibration split."""

    slope: float
    intercept: float
    r: float | None  # correlation of the fit's inputs; None when undefined
    reason: str | None = None

    def apply(self, levels: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(levels, dtype=np.float64) + self.intercept


def fit_calibration(levels: Sequence[np.ndarray], acts: Sequence[np.ndarray]) -> Calibration:
    """Least squares over all calibration tokens; a constant simulation maps to the mean activation."""
    x = np.concatenate([np.asarray(v, dtype=np.float64) for v in levels]) if len(levels) else np.zeros(0)
    y = np.concatenate([np.asarray(a, dtype=np.float64) for a in acts]) if len(acts) else np.zeros(0)
    if x.size == 0 or x.size != y.size:
        return Calibration(0.0, 0.0, None, "no calibration tokens")
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc * xc).sum())
    if sxx <= 1e-12:
        return Calibration(0.0, float(y.mean()), None, "constant simulation on the calibration split")
    slope = float((xc * yc).sum() / sxx)
    syy = float((yc * yc).sum())
    r = float((xc * yc).sum() / np.sqrt(sxx * syy)) if syy > 0 else None
    return Calibration(slope, float(y.mean() - slope * x.mean()), r)


@dataclass(frozen=True)
class SplitScores:
    """One explanation's scores on one split's sequences (top and random records)."""

    corr_all: Float64 | None = field(
        metadata={
            "doc": "Pearson correlation of true and simulated activations over all tokens of the split's top "
            "and random records: the paper's ev_correlation_score (top-and-random scoring)"
        }
    )
    corr_all_reason: Str | None
    corr_top: Float64 | None = field(metadata={"doc": "the same correlation over the top records alone"})
    corr_top_reason: Str | None
    corr_random: Float64 | None = field(metadata={"doc": "the same correlation over the random records alone"})
    corr_random_reason: Str | None
    r2_all: Float64 | None = field(
        metadata={
            "doc": "1 - mean((true - calibrated)^2) / mean(true^2) over top and random records, the simulation "
            "calibrated to activations on the calibration split: the paper's rsquared_score"
        }
    )
    r2_all_reason: Str | None
    absdev_all: Float64 | None = field(
        metadata={"doc": "1 - mean|true - calibrated| / mean|true|, likewise: the paper's absolute_dev_explained_score"}
    )
    absdev_all_reason: Str | None
    n_sequences: Int32 = field(metadata={"doc": "sequences of the split scored (top and random records)"})
    n_tokens: Int32 = field(metadata={"doc": "tokens of those sequences"})


def score_split(
    top_true: Sequence[np.ndarray],
    top_pred: Sequence[np.ndarray],
    random_true: Sequence[np.ndarray],
    random_pred: Sequence[np.ndarray],
    calibration: Calibration | str,
) -> SplitScores:
    """All scores of one explanation on one split: top+random ("all"), top only, random only.
    `calibration` is the fit from the calibration split, or why there is none (then r² and
    absolute deviation are None with that reason)."""
    all_true, all_pred = [*top_true, *random_true], [*top_pred, *random_pred]
    corr_all, corr_top, corr_random = (
        correlation(all_true, all_pred),
        correlation(top_true, top_pred),
        correlation(random_true, random_pred),
    )
    if isinstance(calibration, str):
        r2 = absdev = ScoreResult(None, calibration)
    elif calibration.reason is not None:
        r2 = absdev = ScoreResult(None, f"calibration failed: {calibration.reason}")
    else:
        calibrated = [calibration.apply(p) for p in all_pred]
        r2, absdev = r_squared(all_true, calibrated), absolute_dev_explained(all_true, calibrated)
    return SplitScores(
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


# ---------------------------------------------------------------- the control


MIN_GAP = 0.05  # the mean score - control a layer needs, besides significance, to count as discriminating
ALPHA = 0.05


@dataclass(frozen=True)
class Discrimination:
    """Does the simulator tell a unit's explanation from another unit's, over a layer's units?

    Paired over units: gap = score − control (same sequences, the control simulated from a
    deranged unit's explanation). One-sided sign-flip permutation test of mean gap > 0 (exact for
    up to 16 units, 20,000 seeded draws above), plus a minimum mean gap so a tiny but consistent
    difference is not called discrimination."""

    n_units: int
    mean_score: float | None
    mean_control: float | None
    mean_gap: float | None
    p_value: float | None
    passed: bool
    verdict: str

    def as_metadata(self) -> dict[str, float | int | str | bool | None]:
        return {
            "units_with_control": self.n_units,
            "mean_score": self.mean_score,
            "mean_control": self.mean_control,
            "mean_gap": self.mean_gap,
            "p_value": self.p_value,
            "min_gap": MIN_GAP,
            "alpha": ALPHA,
            "discriminates": self.passed,
        }


def sign_flip_p_value(gaps: np.ndarray, draws: int = 20_000, seed: int = 0) -> float:
    """P(mean of randomly sign-flipped gaps >= observed mean): the paired test's one-sided p-value."""
    gaps = np.asarray(gaps, dtype=np.float64)
    observed = gaps.mean()
    if len(gaps) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(gaps))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(draws, len(gaps)))
    means = (signs * gaps).mean(axis=1)
    return float((means >= observed - 1e-12).mean())


def discrimination(scores: Sequence[float], controls: Sequence[float]) -> Discrimination:
    """The layer-level verdict from paired (score, control) values of units where both are defined."""
    s, c = np.asarray(scores, dtype=np.float64), np.asarray(controls, dtype=np.float64)
    if s.shape != c.shape:
        raise ValueError("scores and controls must pair up")
    n = int(s.size)
    if n < 3:
        return Discrimination(
            n, _mean(s), _mean(c), _mean(s - c), None, False,
            f"not tested: {n} unit(s) with both a score and a control (3 or more needed)",
        )  # fmt: skip
    gaps = s - c
    p = sign_flip_p_value(gaps)
    gap = float(gaps.mean())
    passed = p < ALPHA and gap >= MIN_GAP
    if passed:
        verdict = f"the simulator tells explanations apart: mean gap {gap:+.3f} over {n} units (p = {p:.3g})"
    else:
        verdict = (
            f"the simulator does NOT tell a unit's explanation from another unit's: mean gap {gap:+.3f} over {n} "
            f"units (p = {p:.3g}; needs p < {ALPHA} and gap >= {MIN_GAP}). These scores are not evidence of "
            "what the neurons do."
        )
    return Discrimination(n, float(s.mean()), float(c.mean()), gap, p, passed, verdict)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None
