"""Classification metrics with bootstrap confidence intervals.

All metrics take the true classes ``y`` (``[n]`` ints in ``0..K-1``) and class probabilities
``proba`` (``[n, K]``); predictions are the most probable class (threshold 0.5 when binary).

* accuracy — fraction of correct predictions;
* F1 — of the positive class (index 1) when binary, the unweighted mean over all K classes (macro)
  otherwise; a class never predicted and never present counts 0;
* AUROC — the Mann–Whitney probability that a random positive outscores a random negative
  (ties count one half), computed from ranks; for K > 2 the macro mean of the one-vs-rest AUROCs.

Intervals are percentile bootstraps (:func:`mechsafe.stats.bootstrap`) resampling prompts within
each class, so every resample keeps every class and AUROC stays defined.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mechsafe.stats import Estimate, bootstrap

METRICS = ("auroc", "accuracy", "f1")
"""Metrics reported for every candidate, in table order."""


def _check(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != y.shape[0] or proba.shape[1] < 2:
        raise ValueError(f"proba must be [n, K>=2] matching y (got {proba.shape} for {y.shape[0]} labels)")
    return y, proba


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Fraction of prompts whose most probable class is the true one."""
    y, proba = _check(y, proba)
    return float(np.mean(proba.argmax(1) == y))


def _f1_of(y: np.ndarray, pred: np.ndarray, cls: int) -> float:
    tp = np.sum((pred == cls) & (y == cls))
    denom = np.sum(pred == cls) + np.sum(y == cls)
    return float(2 * tp / denom) if denom else 0.0


def f1(y: np.ndarray, proba: np.ndarray) -> float:
    """F1 of class 1 when binary; macro F1 over all classes otherwise."""
    y, proba = _check(y, proba)
    pred = proba.argmax(1)
    if proba.shape[1] == 2:
        return _f1_of(y, pred, 1)
    return float(np.mean([_f1_of(y, pred, k) for k in range(proba.shape[1])]))


def _binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes")
    if n_pos * n_neg <= 250_000:  # small test sets (the usual case): count the pairs directly, fast
        pos, neg = scores[positive], scores[~positive]
        return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                     / (n_pos * n_neg))
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """AUROC of class 1 when binary; one-vs-rest macro AUROC otherwise. Raises ValueError if a class is absent."""
    y, proba = _check(y, proba)
    if proba.shape[1] == 2:
        return _binary_auroc(y == 1, proba[:, 1])
    return float(np.mean([_binary_auroc(y == k, proba[:, k]) for k in range(proba.shape[1])]))


METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc, "accuracy": accuracy, "f1": f1}
"""Name -> metric function."""


def point_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Every metric without an interval (used on the validation split); NaN where undefined."""
    out = {}
    for name, fn in METRIC_FUNCTIONS.items():
        try:
            out[name] = fn(y, proba)
        except ValueError:
            out[name] = float("nan")
    return out


def metrics_with_ci(y: np.ndarray, proba: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict[str, Estimate]:
    """Every metric with a stratified percentile-bootstrap interval."""
    y = np.asarray(y)
    out = {}
    for name, fn in METRIC_FUNCTIONS.items():
        try:
            out[name] = bootstrap(fn, y, proba, n_boot=n_boot, level=level, seed=seed, stratify=y)
        except ValueError:
            out[name] = Estimate(float("nan"), float("nan"), float("nan"), level)
    return out


def paired_difference(metric: str, y: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray,
                      n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """``metric(a) - metric(b)`` on the same prompts, with a paired stratified bootstrap interval."""
    fn = METRIC_FUNCTIONS[metric]
    return bootstrap(lambda yy, a, b: fn(yy, a) - fn(yy, b), np.asarray(y), proba_a, proba_b,
                     n_boot=n_boot, level=level, seed=seed, stratify=np.asarray(y))


def confusion_matrix(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """``[K, K]`` counts: row = true class, column = predicted class."""
    y, proba = _check(y, proba)
    k = proba.shape[1]
    out = np.zeros((k, k), dtype=np.int64)
    np.add.at(out, (y, proba.argmax(1)), 1)
    return out
