"""Statistics of judge verdicts: win rates with bootstrap intervals, position bias, the length-controlled win
rate, per-category breakdowns. numpy float64 throughout.

Notation (pairwise, per prompt i of n judged prompts):
    y_i in {0, 1/2, 1}      outcome for model A: win 1, tie 1/2, loss 0 (after combining both orders)
    win rate                mean_i y_i
    z_i = tanh((len_a_i - len_b_i) / std(len_a - len_b))     normalized length difference (characters)
    length-controlled       fit P(A wins | z) = sigmoid(theta + beta * z) by maximum likelihood (y_i as a
                            fractional target); LC win rate = sigmoid(theta), the win rate at equal length
                            (AlpacaEval 2.0, Dubois et al. 2024, with only the length term)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                 statistic: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over the rows of ``values``.

    Equal to::

        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(resamples, n))          # rows drawn with replacement
        stats = [statistic(values[row]) for row in idx]
        np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])

    ``statistic`` maps a (resamples, n) array to (resamples,) when given (vectorized).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))
    draws = x[idx]
    stats = draws.mean(axis=1) if statistic is None else statistic(draws)
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -t))


def logistic_fit(features: np.ndarray, y: np.ndarray, *, max_iter: int = 100, tol: float = 1e-10):
    """Maximum-likelihood logistic regression by Newton's method (IRLS) with step halving, float64.

    Args:
        features: (n, d) design matrix (include a column of ones for an intercept).
        y: (n,) targets in [0, 1] (fractional targets maximize the same Bernoulli log-likelihood).
    Returns:
        (coefficients (d,), converged). Not converged means the likelihood has no finite maximum (the outcomes
        are separable by the features) or the iteration limit was hit.
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.zeros(X.shape[1])

    def loglik(w):
        t = X @ w
        return float(np.sum(y * -np.logaddexp(0.0, -t) + (1 - y) * -np.logaddexp(0.0, t)))

    current = loglik(w)
    for _ in range(max_iter):
        p = _sigmoid(X @ w)
        grad = X.T @ (y - p)
        hess = (X * (p * (1 - p))[:, None]).T @ X
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return w, False
        scale = 1.0
        while scale > 1e-8:  # the log-likelihood is concave: a short enough Newton step increases it
            candidate = w + scale * step
            value = loglik(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        w, current = candidate, value
        if np.max(np.abs(scale * step)) < tol:
            return w, bool(np.all(np.abs(w) < 30))
        if np.max(np.abs(w)) > 50:  # heading to infinity: separation
            return w, False
    return w, False


def length_controlled_win_rate(y: Sequence[float], len_a: Sequence[float], len_b: Sequence[float]) -> dict:
    """``{"lc_win_rate", "theta", "beta", "converged"}`` (see the module docstring).

    With constant outcomes (all wins, or all losses) there is no finite fit: ``lc_win_rate`` is then None and
    ``converged`` False. With equal lengths everywhere the length term is 0 and the LC win rate is the win rate.
    """
    y = np.asarray(y, dtype=np.float64)
    diff = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    spread = diff.std()
    z = np.tanh(diff / spread) if spread > 0 else np.zeros_like(diff)
    X = np.stack([np.ones_like(z), z], axis=1) if spread > 0 else np.ones((len(y), 1))
    if len(y) == 0 or np.all(y == y[0]) and y[0] in (0.0, 1.0):
        return {"lc_win_rate": None, "theta": None, "beta": None, "converged": False}
    w, converged = logistic_fit(X, y)
    theta, beta = float(w[0]), float(w[1]) if w.shape[0] > 1 else 0.0
    return {"lc_win_rate": float(_sigmoid(np.array(theta))) if converged else None, "theta": theta,
            "beta": beta, "converged": converged}


def pairwise_summary(rows: list[dict], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Summary of pairwise verdict rows (``fastalign.feedback.judge`` format) with a ``winner``."""
    judged = [r for r in rows if r["winner"] is not None]
    y = np.array([r["score_a"] for r in judged], dtype=np.float64)
    out = {
        "n": len(judged), "unparseable": len(rows) - len(judged),
        "wins_a": sum(r["winner"] == "a" for r in judged), "wins_b": sum(r["winner"] == "b" for r in judged),
        "ties": sum(r["winner"] == "tie" for r in judged),
    }
    if not judged:
        return {**out, "win_rate_a": None, "ci_a": None, "position_bias_rate": None, "first_position_win_rate": None,
                "length_controlled": None}
    out["win_rate_a"] = float(y.mean())
    out["ci_a"] = list(bootstrap_ci(y, resamples=resamples, confidence=confidence, seed=seed))
    out["position_bias_rate"] = float(np.mean([not r["consistent"] for r in judged]))
    # of the single-order verdicts that named a winner, how many named the answer shown first
    decided = [(o["first"], o["verdict"]) for r in judged for o in r["orders"] if o["verdict"] in ("a", "b")]
    out["first_position_win_rate"] = (float(np.mean([f == v for f, v in decided])) if decided else None)
    out["length_controlled"] = length_controlled_win_rate(y, [r["len_a"] for r in judged],
                                                          [r["len_b"] for r in judged])
    soft = [r["soft_score_a"] for r in judged if r.get("soft_score_a") is not None]
    out["soft_win_rate_a"] = float(np.mean(soft)) if len(soft) == len(judged) else None
    categories = sorted({r.get("category") for r in judged if r.get("category") is not None})
    out["categories"] = {}
    for c in categories:
        part = [r for r in judged if r.get("category") == c]
        yc = np.array([r["score_a"] for r in part], dtype=np.float64)
        out["categories"][c] = {
            "n": len(part), "win_rate_a": float(yc.mean()),
            "ci_a": list(bootstrap_ci(yc, resamples=resamples, confidence=confidence, seed=seed)),
            "wins_a": sum(r["winner"] == "a" for r in part), "wins_b": sum(r["winner"] == "b" for r in part),
            "ties": sum(r["winner"] == "tie" for r in part),
            "position_bias_rate": float(np.mean([not r["consistent"] for r in part])),
        }
    return out


def single_summary(rows: list[dict], *, low: int, high: int, resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> dict:
    """Per model: mean grade with a bootstrap interval, grade counts, unparseable count, per-category means."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        graded = [r for r in mine if r["score"] is not None]
        scores = np.array([r["score"] for r in graded], dtype=np.float64)
        entry = {"n": len(graded), "unparseable": len(mine) - len(graded),
                 "mean": float(scores.mean()) if len(graded) else None,
                 "ci": list(bootstrap_ci(scores, resamples=resamples, confidence=confidence, seed=seed))
                 if len(graded) else None,
                 "counts": {str(s): int(np.sum(np.rint(scores) == s)) for s in range(low, high + 1)},
                 "categories": {}}
        for c in sorted({r.get("category") for r in graded if r.get("category") is not None}):
            sc = np.array([r["score"] for r in graded if r.get("category") == c], dtype=np.float64)
            entry["categories"][c] = {"n": int(sc.size), "mean": float(sc.mean())}
        out[model] = entry
    return out
