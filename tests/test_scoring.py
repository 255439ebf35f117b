"""Score formulas against hand-computed values, the concatenation rule, calibration, the control's
paired test, and the undefined cases; the token-space baseline against a hand-made table."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.baseline import TokenLookupSimulator, token_space_explanation
from pipeline.core.scoring import (
    MIN_GAP,
    ZERO_PRED,
    ZERO_TRUE,
    Calibration,
    absolute_dev_explained,
    correlation,
    discrimination,
    fit_calibration,
    r_squared,
    score_split,
    sign_flip_p_value,
)


def arr(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float64)


def test_correlation_is_over_the_concatenation_not_a_mean_of_sequences() -> None:
    # Each sequence alone correlates perfectly (+1 and +1), but the second is shifted down:
    # t = [0, 1, 2, 3], p = [0, 1, -10, -9]. Means 1.5 and -4.5; deviations t: -1.5 -.5 .5 1.5,
    # p: 4.5 5.5 -5.5 -4.5. Cov sum = -6.75 -2.75 -2.75 -6.75 = -19; |t|² = 5; |p|² = 20.25+30.25+30.25+20.25 = 101.
    # r = -19 / sqrt(5 * 101) = -0.845500...
    got = correlation([arr(0, 1), arr(2, 3)], [arr(0, 1), arr(-10, -9)])
    assert got.value == pytest.approx(-19 / np.sqrt(5 * 101), abs=1e-12)
    assert correlation([arr(0, 1), arr(2, 3)], [arr(0, 2), arr(4, 6)]).value == pytest.approx(1.0)


def test_r_squared_and_absolute_deviation_by_hand() -> None:
    t, p = [arr(1, 2), arr(3)], [arr(1, 1), arr(5)]
    # mean((t-p)^2) = (0 + 1 + 4)/3 = 5/3; mean(t^2) = 14/3 -> 1 - 5/14
    assert r_squared(t, p).value == pytest.approx(1 - 5 / 14)
    # mean|t-p| = 3/3 = 1; mean|t| = 2 -> 0.5
    assert absolute_dev_explained(t, p).value == pytest.approx(0.5)


def test_undefined_scores_are_none_with_a_reason() -> None:
    zeros, ramp = [arr(0, 0, 0)], [arr(1, 2, 3)]
    assert correlation(zeros, ramp).value is None and correlation(zeros, ramp).reason == ZERO_TRUE
    assert correlation(ramp, [arr(4, 4, 4)]).reason == ZERO_PRED
    assert r_squared(zeros, ramp).value is None and r_squared(zeros, ramp).reason
    assert absolute_dev_explained(zeros, ramp).value is None
    nan = correlation([arr(1, np.nan, 3)], ramp)
    assert nan.value is None and "non-finite" in nan.reason
    assert correlation([], []).reason == "no held-out tokens"
    with pytest.raises(ValueError):
        correlation([arr(1, 2)], [arr(1)])


def test_score_split_splits_top_and_random_and_calibrates_r2() -> None:
    top_t, top_p = [arr(0, 4)], [arr(0, 10)]
    rnd_t, rnd_p = [arr(2, 0)], [arr(0, 5)]  # anti-correlated
    cal = Calibration(slope=0.4, intercept=0.0, r=None)  # levels 0..10 -> activations 0..4
    s = score_split(top_t, top_p, rnd_t, rnd_p, cal)
    assert s.corr_top == pytest.approx(1.0) and s.corr_random == pytest.approx(-1.0)
    # all: t = [0, 4, 2, 0], p = [0, 10, 0, 5]
    assert s.corr_all == pytest.approx(np.corrcoef([0, 4, 2, 0], [0, 10, 0, 5])[0, 1])
    # calibrated p = [0, 4, 0, 2] vs t = [0, 4, 2, 0]: mse 8/4, mean t² 20/4 -> 1 - 8/20; abs: 4/4 vs 6/4
    assert s.r2_all == pytest.approx(1 - 8 / 20) and s.absdev_all == pytest.approx(1 - 4 / 6)
    assert (s.n_sequences, s.n_tokens) == (2, 4)
    uncalibrated = score_split(top_t, top_p, rnd_t, rnd_p, "no calibration split")
    assert uncalibrated.r2_all is None and uncalibrated.r2_all_reason == "no calibration split"
    assert uncalibrated.corr_all == s.corr_all


def test_calibration_recovers_a_scaled_and_shifted_simulation() -> None:
    rng = np.random.default_rng(0)
    true = [rng.gamma(1.0, 2.0, size=16) for _ in range(4)]
    pred = [3.0 * t + 1.5 for t in true]  # a perfect simulation on another scale and offset
    cal = fit_calibration(pred, true)
    assert cal.slope == pytest.approx(1 / 3) and cal.intercept == pytest.approx(-0.5) and cal.r == pytest.approx(1.0)
    held_t = [rng.gamma(1.0, 2.0, size=16) for _ in range(3)]
    s = score_split(held_t[:2], [3.0 * t + 1.5 for t in held_t[:2]], held_t[2:], [3.0 * held_t[2] + 1.5], cal)
    assert s.r2_all == pytest.approx(1.0) and s.absdev_all == pytest.approx(1.0) and s.corr_all == pytest.approx(1.0)
    # Without calibration the same simulation is far off in activation space: r² is what calibration buys.
    assert r_squared(held_t, [3.0 * t + 1.5 for t in held_t]).value < 0
    flat = fit_calibration([arr(2, 2, 2)], [arr(1, 2, 3)])
    assert flat.reason and flat.intercept == pytest.approx(2.0)


def test_sign_flip_p_value_is_exact_for_small_samples() -> None:
    # 4 positive gaps: of the 16 sign patterns only all-positive reaches the observed mean.
    assert sign_flip_p_value(arr(0.1, 0.2, 0.3, 0.4)) == pytest.approx(1 / 16)
    assert sign_flip_p_value(arr(0.0, 0.0, 0.0)) == pytest.approx(1.0)
    # Symmetric gaps: exactly half the patterns reach a mean >= 0.
    assert sign_flip_p_value(arr(0.5, -0.5)) == pytest.approx(3 / 4)


def test_discrimination_passes_only_a_clear_gap_and_warns_otherwise() -> None:
    scores = [0.8, 0.7, 0.9, 0.6, 0.75, 0.85]
    good = discrimination(scores, [0.1, 0.0, 0.2, -0.1, 0.05, 0.1])
    assert good.passed and good.p_value == pytest.approx(1 / 64) and good.mean_gap > 0.5
    same = discrimination(scores, scores)
    assert not same.passed and "does NOT" in same.verdict
    tiny = discrimination(scores, [s - MIN_GAP / 2 for s in scores])  # consistent but negligible
    assert not tiny.passed and tiny.p_value < 0.05
    few = discrimination([0.9, 0.8], [0.0, 0.1])
    assert not few.passed and few.p_value is None and "not tested" in few.verdict


TABLE = [
    {"token_id": 7, "token": " 7", "mean_activation": 3.0, "count": 4},
    {"token_id": 9, "token": "\n", "mean_activation": 8.0, "count": 2},
]


def test_token_lookup_simulator_predicts_from_the_table() -> None:
    sim = TokenLookupSimulator(TABLE, max_activation=6.0)
    (got,) = sim.simulate_ids([[7, 1, 9]])
    np.testing.assert_allclose(got, [5.0, 0.0, 10.0])  # 10*3/6, unseen, 10*8/6 clipped at 10
    (by_string,) = sim.simulate("ignored", [[" 7", "x", "\n"]])
    np.testing.assert_allclose(by_string, [5.0, 0.0, 10.0])


def test_token_space_explanation() -> None:
    assert token_space_explanation(TABLE) == 'tokens " 7", "\\n"'
    assert token_space_explanation([]) is None


def test_rank_correlation() -> None:
    from pipeline.infra.report import rank_correlation

    assert rank_correlation(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 400])) == pytest.approx(1.0)
    assert rank_correlation(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1.5, 1.5, 3], y ranks [1, 2, 3] -> corr = 0.866...
    assert rank_correlation(np.array([5, 5, 9]), np.array([1, 2, 3])) == pytest.approx(np.sqrt(3) / 2)
    assert rank_correlation(np.array([1, 2]), np.array([1, 2])) is None
    assert rank_correlation(np.array([1, 1, 1]), np.array([1, 2, 3])) is None
