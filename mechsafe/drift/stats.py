"""Statistics of the drift study: group means with bootstrap intervals, effect sizes, tests and the verdict.

The verdict rule (fixed before any run; see docs/drift.md):

* primary measure: the **relative change** ``‖Δ‖ / ‖w0‖`` of each MLP neuron at the end of the *harmful* fine-tune,
  averaged over seeds per neuron (normalised, because neuron norms differ by group);
* **H1** (fragile safety: safety-critical neurons drift more) when a safety group (``top-safety`` or
  ``set-difference``) drifts more than the size-matched ``random`` group with Cohen's d >= ``min_d`` and a
  Holm-adjusted p < ``alpha`` in both Welch's t-test and the Mann-Whitney U test;
* **H2** (about as much: safety falls while fine-tuning builds new pathways) when no safety group meets that and
  the harmful fine-tune took the refusal share to at most half of its initial value;
* **inconclusive** otherwise (safety did not fall, so there is nothing for drift to explain).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mechsafe.stats import bootstrap

SAFETY_GROUPS = ("top-safety", "set-difference")
"""The groups the hypotheses are about."""
BASELINES = ("random", "top-utility")
"""What each safety group is compared with."""


def cohen_d(x: Sequence[float], y: Sequence[float]) -> float:
    """``(mean(x) - mean(y)) / s_pooled`` with the pooled standard deviation of the two samples (n - 1 each)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    pooled = ((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2)
    return float((x.mean() - y.mean()) / np.sqrt(pooled)) if pooled > 0 else 0.0


def compare(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Cohen's d of ``x`` over ``y`` and two-sided Welch's t and Mann-Whitney U tests (scipy)."""
    from scipy import stats

    t = stats.ttest_ind(x, y, equal_var=False)
    u = stats.mannwhitneyu(x, y, alternative="two-sided")
    return {"d": cohen_d(x, y), "welch_t": float(t.statistic), "welch_p": float(t.pvalue),
            "mwu_u": float(u.statistic), "mwu_p": float(u.pvalue), "n_x": len(x), "n_y": len(y)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def group_summary(values: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Mean of a group's ``values`` ``[n_seeds, n_units]`` with a bootstrap interval over units (of the per-unit
    mean over seeds) and one over seeds (of the per-seed group mean)."""
    values = np.asarray(values, dtype=float)
    per_unit, per_seed = values.mean(0), values.mean(1)
    return {"mean": float(values.mean()), "over_units": bootstrap(np.mean, per_unit, n_boot=n_boot, seed=seed).to_dict(),
            "over_seeds": bootstrap(np.mean, per_seed, n_boot=n_boot, seed=seed).to_dict(),
            "n_units": int(values.shape[1]), "n_seeds": int(values.shape[0])}


def comparisons(per_unit: dict[str, dict[str, dict[str, np.ndarray]]]) -> list[dict[str, Any]]:
    """Every safety group against every baseline, for each condition and metric of ``per_unit``
    (``{condition: {metric: {group: per-unit values}}}``), with Holm-adjusted p-values over the whole family (both
    tests of every comparison)."""
    rows = []
    for condition, metrics in per_unit.items():
        for metric, groups in metrics.items():
            for group in SAFETY_GROUPS:
                for baseline in BASELINES:
                    if group in groups and baseline in groups:
                        rows.append({"condition": condition, "metric": metric, "group": group, "baseline": baseline,
                                     **compare(groups[group], groups[baseline])})
    adjusted = holm([r[k] for r in rows for k in ("welch_p", "mwu_p")])
    for i, r in enumerate(rows):
        r["welch_p_holm"], r["mwu_p_holm"] = adjusted[2 * i], adjusted[2 * i + 1]
    return rows


def verdict(tests: Sequence[dict[str, Any]], refusal_start: float, refusal_end: float, alpha: float = 0.05,
            min_d: float = 0.2, condition: str = "harmful", metric: str = "relative") -> dict[str, Any]:
    """The H1/H2 verdict of the module's rule from :func:`comparisons` rows and the harmful fine-tune's refusal
    share at its start and end (mean over seeds)."""
    drifting = [t for t in tests if t["condition"] == condition and t["metric"] == metric and t["baseline"] == "random"
                and t["d"] >= min_d and t["welch_p_holm"] < alpha and t["mwu_p_holm"] < alpha]
    fell = refusal_end <= 0.5 * refusal_start
    if drifting:
        answer = "H1"
        why = ", ".join(f"{t['group']} d={t['d']:.2f}" for t in drifting) + " over random"
    elif fell:
        answer = "H2"
        why = (f"refusal share {refusal_start:.2f} -> {refusal_end:.2f} while no safety group drifted more than random "
               f"(d >= {min_d}, Holm p < {alpha} in both tests)")
    else:
        answer = "inconclusive"
        why = f"refusal share {refusal_start:.2f} -> {refusal_end:.2f} did not halve and no safety group drifted more"
    return {"answer": answer, "reason": why, "rule": {"alpha": alpha, "min_d": min_d, "condition": condition,
                                                      "metric": metric}}

