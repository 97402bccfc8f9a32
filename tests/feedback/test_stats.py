"""Judge statistics: bootstrap intervals (vs a loop over the same draws, vs the normal approximation), the
length-controlled win rate (vs statsmodels' binomial GLM), position bias and category breakdowns on hand rows."""
import math

import numpy as np
import pytest
import statsmodels.api as sm  # a dev dependency: pip install -e ".[dev]"

from fastalign.feedback.stats import (bootstrap_ci, length_controlled_win_rate, logistic_fit, pairwise_summary,
                                      single_summary)


def test_bootstrap_equals_a_loop_over_the_same_draws():
    rng = np.random.default_rng(0)
    y = rng.choice([0.0, 0.5, 1.0], size=37, p=[0.3, 0.2, 0.5])
    lo, hi = bootstrap_ci(y, resamples=500, confidence=0.9, seed=11)
    draws = np.random.default_rng(11).integers(0, 37, size=(500, 37))
    means = [sum(y[i] for i in row) / 37 for row in draws]  # one resample at a time
    want = np.quantile(means, [0.05, 0.95])
    assert (lo, hi) == pytest.approx(tuple(want), abs=1e-12)
    assert lo < y.mean() < hi


def test_bootstrap_agrees_with_the_normal_approximation():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.3).astype(float)
    lo, hi = bootstrap_ci(y, resamples=4000, seed=0)
    p = y.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / len(y))  # Wald interval, fine at n = 400, p = 0.3
    assert lo == pytest.approx(p - half, abs=0.006) and hi == pytest.approx(p + half, abs=0.006)
    assert all(math.isnan(v) for v in bootstrap_ci([], resamples=10))  # no data, no interval


def _glm(X, y):
    """statsmodels' binomial GLM with ties split into a half win and a half loss (the same likelihood)."""
    rows, targets, weights = [], [], []
    for x, t in zip(X, y):
        for value, w in ((1.0, t), (0.0, 1 - t)):
            if w > 0:
                rows.append(x)
                targets.append(value)
                weights.append(w)
    fit = sm.GLM(np.array(targets), np.array(rows), family=sm.families.Binomial(),
                 freq_weights=np.array(weights)).fit(tol=1e-14)
    return fit.params


def test_logistic_fit_matches_statsmodels():
    rng = np.random.default_rng(2)
    n = 120
    X = np.stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)], axis=1)
    true = np.array([0.3, 1.2, -0.7])
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ true))).astype(float)
    y[::7] = 0.5  # some ties
    w, converged = logistic_fit(X, y)
    assert converged
    np.testing.assert_allclose(w, _glm(X, y), rtol=1e-8, atol=1e-10)


def test_length_controlled_win_rate_matches_statsmodels():
    rng = np.random.default_rng(3)
    n = 200
    len_a = rng.integers(50, 400, size=n).astype(float)
    len_b = rng.integers(50, 400, size=n).astype(float)
    z = np.tanh((len_a - len_b) / np.std(len_a - len_b))
    # A wins more often when it is longer: a length-biased judge at a true equal-length win rate of 0.4
    y = (rng.random(n) < 1 / (1 + np.exp(-(math.log(0.4 / 0.6) + 1.5 * z)))).astype(float)
    y[rng.random(n) < 0.1] = 0.5
    out = length_controlled_win_rate(y, len_a, len_b)
    theta, beta = _glm(np.stack([np.ones(n), z], axis=1), y)
    assert out["converged"] and out["theta"] == pytest.approx(theta, abs=1e-9)
    assert out["beta"] == pytest.approx(beta, abs=1e-9) and out["beta"] > 0
    assert out["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-theta)), abs=1e-12)


def test_length_controlled_edge_cases():
    y = np.array([1.0, 0.0, 0.5, 1.0, 1.0])
    same = length_controlled_win_rate(y, [10] * 5, [10] * 5)  # no length differences: LC = the win rate
    assert same["converged"] and same["lc_win_rate"] == pytest.approx(y.mean(), abs=1e-12) and same["beta"] == 0
    all_wins = length_controlled_win_rate([1.0] * 4, [1, 2, 3, 4], [2, 2, 2, 2])
    assert all_wins["lc_win_rate"] is None and not all_wins["converged"]
    separable = length_controlled_win_rate([1.0, 1.0, 0.0, 0.0], [9, 8, 1, 2], [1, 2, 9, 8])  # longer always wins
    assert separable["lc_win_rate"] is None and not separable["converged"]


def _row(winner, consistent, first_verdicts, category, len_a=10, len_b=10):
    score = {"a": 1.0, "tie": 0.5, "b": 0.0, None: None}[winner]
    orders = [{"first": "a", "verdict": first_verdicts[0]}, {"first": "b", "verdict": first_verdicts[1]}]
    return {"winner": winner, "score_a": score, "consistent": consistent, "orders": orders, "category": category,
            "len_a": len_a, "len_b": len_b, "soft_score_a": None}


def test_pairwise_summary_on_hand_rows():
    rows = [
        _row("a", True, ("a", "a"), "x"),
        _row("a", True, ("a", "a"), "x"),
        _row("tie", False, ("a", "b"), "x"),  # each order picked the answer shown first: position bias
        _row("b", True, ("b", "b"), "y"),
        _row("tie", True, ("tie", "tie"), "y"),
        _row(None, None, (None, "a"), "y"),  # unparseable: counted, not in the rates
    ]
    s = pairwise_summary(rows, resamples=200, seed=0)
    assert (s["n"], s["unparseable"], s["wins_a"], s["wins_b"], s["ties"]) == (5, 1, 2, 1, 2)
    assert s["win_rate_a"] == pytest.approx((1 + 1 + 0.5 + 0 + 0.5) / 5)
    assert s["position_bias_rate"] == pytest.approx(1 / 5)
    # single-order verdicts naming a winner (order 1 shows a first, order 2 shows b first): a,a | a,a | a,b | b,b.
    # A consistent verdict names the first-shown answer in exactly one of its two orders; the biased row in both:
    # 1 + 1 + 2 + 1 of 8
    assert s["first_position_win_rate"] == pytest.approx(5 / 8)
    assert s["categories"]["x"]["win_rate_a"] == pytest.approx(2.5 / 3) and s["categories"]["y"]["n"] == 2
    assert s["categories"]["x"]["position_bias_rate"] == pytest.approx(1 / 3)
    assert s["length_controlled"]["lc_win_rate"] == pytest.approx(s["win_rate_a"], abs=1e-9)  # equal lengths
    lo, hi = s["ci_a"]
    assert lo <= s["win_rate_a"] <= hi


def test_single_summary():
    rows = [{"model": "m", "score": 7, "category": "c"}, {"model": "m", "score": 5, "category": "d"},
            {"model": "m", "score": None, "category": "c"}, {"model": "n", "score": 6.6, "category": "c"}]
    s = single_summary(rows, low=1, high=10, resamples=100)
    assert s["m"]["n"] == 2 and s["m"]["unparseable"] == 1 and s["m"]["mean"] == 6
    assert s["m"]["counts"]["7"] == 1 and s["n"]["counts"]["7"] == 1 and s["m"]["categories"]["d"]["mean"] == 5
