"""Confidence intervals shared by every metric mechsafe reports.

Proportions (refusal rates, over-refusal, accuracy) get the Wilson score interval, which stays honest at 0 or n
successes (0 of 60 gives [0, 0.060], where a percentile bootstrap gives the degenerate [0, 0]); every other
metric (AUROC, NLL ratios, differences) gets the percentile bootstrap.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval."""

    value: float
    """The metric on the full sample."""
    low: float
    """Lower bound of the interval."""
    high: float
    """Upper bound of the interval."""
    level: float = 0.95
    """Coverage of the interval."""

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> "Estimate":
        """The estimate back from :meth:`to_dict`'s dict (other keys, such as a sample size ``n``, are ignored)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def bootstrap(metric: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, level: float = 0.95,
              seed: int = 0, stratify: np.ndarray | None = None) -> Estimate:
    """Percentile bootstrap of ``metric(*arrays)`` resampling rows of all arrays together.

    Resamples where the metric is undefined (e.g. AUROC of a one-class resample) are skipped;
    ``stratify`` resamples within each class so every resample keeps all classes.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    value = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(stratify == c) for c in np.unique(stratify)] if stratify is not None else [np.arange(n)]
    stats = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        try:
            stat = float(metric(*(a[idx] for a in arrays)))
        except ValueError:
            continue
        if np.isfinite(stat):
            stats.append(stat)
    if not stats:
        return Estimate(value, float("nan"), float("nan"), level)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), level)


def proportion(flags, level: float = 0.95) -> Estimate:
    """Mean of a boolean array (a rate) with its Wilson score interval (Wilson, 1927).

    With ``k`` of ``n`` flags set, ``p = k / n`` and ``z`` the normal quantile of ``(1 + level) / 2``, the bounds are
    ``(p + z²/2n ± z·sqrt(p(1 − p)/n + z²/4n²)) / (1 + z²/n)``: never outside [0, 1], and not degenerate at 0 or n.
    """
    from scipy.stats import norm

    flags = np.asarray(flags, dtype=float)
    n = len(flags)
    if n == 0:
        raise ValueError("cannot estimate a proportion of an empty sample")
    p = float(flags.mean())
    z = float(norm.ppf((1 + level) / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if p == 0 else max(0.0, float(centre - half))  # exactly 0 and 1 at the ends, without rounding
    high = 1.0 if p == 1 else min(1.0, float(centre + half))
    return Estimate(p, low, high, level)


def paired_rate_difference(flags_a, flags_b, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """``mean(flags_a) - mean(flags_b)`` for two sets of flags on the same items, with a paired bootstrap interval
    (items resampled together), the interval that decides whether two models differ on the same prompts."""
    a, b = np.asarray(flags_a, dtype=float), np.asarray(flags_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired flags need the same items ({a.shape} vs {b.shape})")
    return bootstrap(lambda x, y: float(x.mean() - y.mean()), a, b, n_boot=n_boot, level=level, seed=seed)


def proportions_by(flags, groups) -> dict[str, dict[str, float]]:
    """The rate of ``flags`` within each group (a label per flag), sorted by group: :func:`proportion`'s
    estimate as a dict plus ``n``, the group's size."""
    flags, groups = np.asarray(flags, dtype=float), np.asarray(groups)
    return {str(g): proportion(flags[groups == g]).to_dict() | {"n": int((groups == g).sum())}
            for g in sorted(set(groups.tolist()))}
