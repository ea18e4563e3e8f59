"""Fit and score candidates, pick each method's best layer, compare methods by their intervals.

One function, :func:`evaluate`, serves every method: fit ``make_estimator(seed)`` on the training
rows (any hyper-parameter search happens inside that fit, so it sees training rows only), score
validation rows without intervals and test rows with bootstrap intervals. The best layer of a
method is the one with the highest validation metric (ties: higher validation accuracy, then the
lower layer); its test metrics are what the report headlines.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Sequence

import numpy as np

from mechsafe.probes.methods import Candidate, chosen_c
from mechsafe.probes.metrics import confusion_matrix, metrics_with_ci, paired_difference, point_metrics
from mechsafe.probes.splits import BenchSplit
from mechsafe.stats import Estimate

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CandidateResult:
    """A fitted candidate's numbers."""

    method: str
    """Method as in the table (``dense/last``, ``tfidf``...)."""
    layer: int | None
    """Layer of the features (``None`` for text baselines)."""
    pooling: str | None
    """Pooling of the features."""
    c: float | None
    """Regularization C chosen by cross-validation on the training rows (``None``: no search)."""
    val: dict[str, float]
    """Validation metrics (no intervals; they only select layers)."""
    test: dict[str, Estimate]
    """Test metrics with bootstrap intervals."""
    confusion: list[list[int]]
    """Test confusion matrix (row = true class, column = predicted)."""
    fit_seconds: float
    """Wall time of the fit."""
    test_proba: np.ndarray = dataclasses.field(repr=False, default=None)
    """Test-row class probabilities (kept in memory for paired comparisons, not serialized)."""
    estimator: Any = dataclasses.field(repr=False, default=None)
    """The fitted estimator (kept in memory to save probes, not serialized)."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "pooling": self.pooling, "C": self.c,
                "val": self.val, "test": {k: v.to_dict() for k, v in self.test.items()},
                "confusion": self.confusion, "fit_seconds": round(self.fit_seconds, 3)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CandidateResult":
        """The result back from :meth:`to_dict` (without the test probabilities and the estimator)."""
        return cls(method=d["method"], layer=d["layer"], pooling=d["pooling"], c=d["C"], val=d["val"],
                   test={k: Estimate.from_dict(v) for k, v in d["test"].items()}, confusion=d["confusion"],
                   fit_seconds=d["fit_seconds"])


@dataclasses.dataclass
class Comparison:
    """Method ``a`` against method ``b`` on one test metric."""

    a: str
    """Label of the first method (e.g. ``dense/last @ layer 12``)."""
    b: str
    """Label of the second method."""
    metric: str
    """The metric compared."""
    a_value: Estimate
    """``a``'s test metric with its interval."""
    b_value: Estimate
    """``b``'s test metric with its interval."""
    difference: Estimate
    """``a - b`` with a paired bootstrap interval (same resampled prompts for both)."""
    verdict: str
    """From the paired difference's interval: ``better`` (it lies above 0), ``worse`` (below 0) or ``tie`` (it holds 0).
    Two methods scored on the same prompts are compared by their paired difference, never by whether their marginal
    intervals overlap (which would miss differences the pairing resolves)."""

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "metric": self.metric, "a_value": self.a_value.to_dict(),
                "b_value": self.b_value.to_dict(), "difference": self.difference.to_dict(), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Comparison":
        return cls(d["a"], d["b"], d["metric"], Estimate.from_dict(d["a_value"]), Estimate.from_dict(d["b_value"]),
                   Estimate.from_dict(d["difference"]), d["verdict"])


def _full_proba(estimator: Any, X: Any, n_classes: int) -> np.ndarray:
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    classes = np.asarray(getattr(estimator, "classes_", np.arange(proba.shape[1]))).astype(int)
    out = np.zeros((proba.shape[0], n_classes))
    out[:, classes] = proba
    return out


def evaluate(candidate: Candidate, labels: np.ndarray, split: BenchSplit, *, n_classes: int, seed: int = 0,
             n_boot: int = 1000, level: float = 0.95) -> CandidateResult:
    """Fit ``candidate`` on the training rows and score the validation and test rows."""
    if candidate.n_rows() != len(labels):
        raise ValueError(f"candidate {candidate.key} has {candidate.n_rows()} rows for {len(labels)} prompts")
    t0 = time.perf_counter()
    est = candidate.make_estimator(seed)
    est.fit(candidate.rows(split.train), labels[split.train])
    seconds = time.perf_counter() - t0
    val_proba = _full_proba(est, candidate.rows(split.val), n_classes)
    test_proba = _full_proba(est, candidate.rows(split.test), n_classes)
    y_test = labels[split.test]
    return CandidateResult(
        method=candidate.key, layer=candidate.layer, pooling=candidate.pooling, c=chosen_c(est),
        val=point_metrics(labels[split.val], val_proba),
        test=metrics_with_ci(y_test, test_proba, n_boot=n_boot, level=level, seed=seed),
        confusion=confusion_matrix(y_test, test_proba).tolist(), fit_seconds=seconds,
        test_proba=test_proba, estimator=est)


def _rank(value: float) -> float:
    return -math.inf if value is None or not math.isfinite(value) else value


def best_per_method(results: Sequence[CandidateResult], select_by: str = "auroc") -> dict[str, CandidateResult]:
    """Each method's best candidate by validation ``select_by`` (ties: accuracy, then lower layer)."""
    best: dict[str, CandidateResult] = {}
    for r in results:
        cur = best.get(r.method)
        key = (_rank(r.val[select_by]), _rank(r.val["accuracy"]), -(r.layer or 0))
        if cur is None or key > (_rank(cur.val[select_by]), _rank(cur.val["accuracy"]), -(cur.layer or 0)):
            best[r.method] = r
    return best


def label(result: CandidateResult) -> str:
    """A method and its layer as written in reports."""
    return result.method if result.layer is None else f"{result.method} @ layer {result.layer}"


def compare(a: CandidateResult, b: CandidateResult, y_test: np.ndarray, metric: str = "auroc", *,
            n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Comparison:
    """Compare two candidates on the test rows: their intervals, and the verdict of their paired difference."""
    diff = paired_difference(metric, y_test, a.test_proba, b.test_proba, n_boot=n_boot, level=level, seed=seed)
    verdict = "better" if diff.low > 0 else "worse" if diff.high < 0 else "tie"
    return Comparison(label(a), label(b), metric, a.test[metric], b.test[metric], diff, verdict)


def best_overall(best: dict[str, CandidateResult], select_by: str = "auroc",
                 model_based: bool = True) -> CandidateResult | None:
    """The best method (by validation ``select_by``) among those with a layer (``model_based``) or all."""
    pool = [r for r in best.values() if r.layer is not None or not model_based]
    if not pool:
        return None
    return max(pool, key=lambda r: (_rank(r.val[select_by]), _rank(r.val["accuracy"]), -(r.layer or 0)))
