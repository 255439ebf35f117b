"""Score formulas against hand-computed values, the concatenation rule, and the undefined cases;
the token-lookup baseline against a hand-made table."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.baseline import TokenLookupSimulator, token_lookup_explanation
from pipeline.scoring import (
    ZERO_PRED,
    ZERO_TRUE,
    absolute_dev_explained,
    correlation,
    r_squared,
    score_neuron,
    to_level_scale,
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


def test_level_scale_is_unfloored_and_clipped() -> None:
    np.testing.assert_allclose(to_level_scale(arr(-1, 0.25, 1, 2), 1.0), [0, 2.5, 10, 10])
    np.testing.assert_array_equal(to_level_scale(arr(1, 2), 0.0), [0, 0])


def test_score_neuron_splits_top_and_random() -> None:
    top_t, top_p = [arr(0, 4)], [arr(0, 10)]  # level scale with max 4: [0, 10] -> exact
    rnd_t, rnd_p = [arr(2, 0)], [arr(0, 5)]  # anti-correlated
    s = score_neuron(top_t, top_p, rnd_t, rnd_p, max_activation=4.0)
    assert s.corr_top == pytest.approx(1.0) and s.corr_random == pytest.approx(-1.0)
    # all: t = [0, 4, 2, 0], p = [0, 10, 0, 5]
    assert s.corr_all == pytest.approx(np.corrcoef([0, 4, 2, 0], [0, 10, 0, 5])[0, 1])
    # levels [0, 10, 5, 0] vs [0, 10, 0, 5]: mse 50/4, mean sq 125/4 -> 1 - 50/125; abs: 10/4 vs 15/4
    assert s.r2_all == pytest.approx(1 - 50 / 125) and s.absdev_all == pytest.approx(1 - 10 / 15)
    assert (s.n_sequences, s.n_tokens) == (2, 4)


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


def test_token_lookup_explanation() -> None:
    assert token_lookup_explanation(TABLE) == 'tokens " 7", "\\n"'
    assert token_lookup_explanation([]) is None


def test_rank_correlation() -> None:
    from pipeline.report import rank_correlation

    assert rank_correlation(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 400])) == pytest.approx(1.0)
    assert rank_correlation(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1.5, 1.5, 3], y ranks [1, 2, 3] -> corr = 0.866...
    assert rank_correlation(np.array([5, 5, 9]), np.array([1, 2, 3])) == pytest.approx(np.sqrt(3) / 2)
    assert rank_correlation(np.array([1, 2]), np.array([1, 2])) is None
    assert rank_correlation(np.array([1, 1, 1]), np.array([1, 2, 3])) is None
