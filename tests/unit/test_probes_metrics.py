"""Probe metrics and their bootstrap intervals: hand-computed cases and agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from mechsafe.probes import metrics as M


def _binary(scores):
    s = np.asarray(scores, dtype=float)
    return np.c_[1 - s, s]


def test_perfect_separator_has_auroc_one_with_interval_in_unit_range():
    y = np.array([0] * 20 + [1] * 20)
    proba = _binary(np.r_[np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 20)])
    est = M.metrics_with_ci(y, proba, n_boot=200, seed=0)
    assert est["auroc"].value == 1.0
    assert 0.0 <= est["auroc"].low <= est["auroc"].high <= 1.0
    assert est["auroc"].low == 1.0  # every resample still separates perfectly
    assert est["accuracy"].value == 1.0 and est["f1"].value == 1.0


def test_hand_computed_binary_case():
    y = np.array([0, 0, 1, 1])
    proba = _binary([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4
    assert M.auroc(y, proba) == pytest.approx(0.75)
    # predictions at 0.5: [0, 0, 0, 1] -> 3 of 4 correct; F1(pos) = 2*1 / (1 + 2)
    assert M.accuracy(y, proba) == pytest.approx(0.75)
    assert M.f1(y, proba) == pytest.approx(2 / 3)
    assert M.confusion_matrix(y, proba).tolist() == [[2, 0], [1, 1]]


def test_ties_count_one_half_and_constant_scores_give_half():
    y = np.array([0, 1, 0, 1])
    assert M.auroc(y, _binary([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert M.auroc(y, _binary([0.2, 0.2, 0.1, 0.9])) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


def test_missing_class_raises_value_error():
    with pytest.raises(ValueError):
        M.auroc(np.array([1, 1, 1]), _binary([0.2, 0.5, 0.9]))


@pytest.mark.parametrize("n", [60, 1500])  # pairwise path and rank path
def test_binary_auroc_matches_sklearn(n):
    rng = np.random.default_rng(n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, 2)  # rounded: many ties
    assert M.auroc(y, _binary(s / s.max())) == pytest.approx(roc_auc_score(y, s))


def test_multiclass_metrics_match_sklearn_macro():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 15)
    logits = rng.normal(size=(60, 4)) + 1.5 * np.eye(4)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert M.auroc(y, proba) == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert M.f1(y, proba) == pytest.approx(f1_score(y, proba.argmax(1), average="macro", labels=range(4)))
    assert M.accuracy(y, proba) == pytest.approx(np.mean(proba.argmax(1) == y))


def test_interval_brackets_value_and_is_reproducible():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    proba = _binary(np.clip(0.5 + 0.3 * (y - 0.5) + 0.3 * rng.normal(size=80), 0, 1))
    a = M.metrics_with_ci(y, proba, n_boot=300, seed=3)
    b = M.metrics_with_ci(y, proba, n_boot=300, seed=3)
    for name in M.METRICS:
        assert a[name] == b[name]
        assert a[name].low <= a[name].value <= a[name].high
        assert a[name].high - a[name].low > 0


def test_paired_difference_of_identical_predictions_is_zero():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 50)
    proba = _binary(rng.random(50))
    d = M.paired_difference("auroc", y, proba, proba, n_boot=100)
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)


def test_verdicts_come_from_the_paired_difference_not_from_overlapping_intervals():
    """b is a's scores plus prompt-level noise: the marginal intervals overlap, the paired difference does not."""
    from mechsafe.probes.evaluate import CandidateResult, compare

    rng = np.random.default_rng(0)
    y = np.array([0] * 60 + [1] * 60)
    signal = y + rng.normal(0, 0.9, len(y))
    a = 1 / (1 + np.exp(-signal))
    b = 1 / (1 + np.exp(-(signal + rng.normal(0, 1.0, len(y)))))

    def result(name, p):
        proba = np.stack([1 - p, p], 1)
        return CandidateResult(method=name, layer=None, pooling=None, c=None, val={},
                               test=M.metrics_with_ci(y, proba, seed=0), confusion=[], fit_seconds=0.0, test_proba=proba)

    ra, rb = result("a", a), result("b", b)
    c = compare(ra, rb, y)
    assert ra.test["auroc"].low < rb.test["auroc"].high  # the marginal intervals overlap ...
    assert c.difference.low > 0 and c.verdict == "better"  # ... the paired difference excludes 0
    assert compare(rb, ra, y).verdict == "worse" and compare(ra, ra, y).verdict == "tie"
