"""Bootstrap confidence intervals shared by every metric mechsafe reports."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a percentile-bootstrap confidence interval."""

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


def proportion(flags: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of a boolean array (a rate) with its bootstrap interval."""
    return bootstrap(lambda f: float(np.mean(f)), np.asarray(flags, dtype=float), n_boot=n_boot, level=level, seed=seed)


def proportions_by(flags, groups, seed: int = 0) -> dict[str, dict[str, float]]:
    """The rate of ``flags`` within each group (a label per flag), sorted by group: :func:`proportion`'s
    estimate as a dict plus ``n``, the group's size."""
    flags, groups = np.asarray(flags, dtype=float), np.asarray(groups)
    return {str(g): proportion(flags[groups == g], seed=seed).to_dict() | {"n": int((groups == g).sum())}
            for g in sorted(set(groups.tolist()))}
