"""Train/validation/test rows of a benchmark, in distribution or out of distribution.

In distribution, every prompt keeps the split its dataset assigned (bundled suites: a fixed
60/20/20 split by a hash of the prompt id). Out of distribution by groups, probes train and
validate on the ``train``/``val`` prompts of ``train_groups`` and are tested on ``test_groups``:
a group only in ``test_groups`` contributes all its prompts, a group in both lists (e.g.
``harmless``) only its ``test`` split, so no test prompt was ever trained on. Out of distribution
by dataset, the test set is the ``test`` split of another dataset with the same classes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from mechsafe.data import SPLITS, PromptSet
from mechsafe.errors import MechsafeError
from mechsafe.probes.config import OODSplit

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchSplit:
    """The prompts whose features are computed, and which rows train, validate and test."""

    prompts: PromptSet
    """Every prompt the candidates' features cover (their row order)."""
    train: np.ndarray
    """Row indices that fit the estimators (cross-validation of C happens inside them)."""
    val: np.ndarray
    """Row indices that pick each method's best layer."""
    test: np.ndarray
    """Held-out row indices every reported metric is computed on."""
    mode: str
    """``in-distribution``, ``ood-groups`` or ``ood-data``."""

    def rows(self, which: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[which]

    def summary(self) -> dict[str, Any]:
        """Counts per split and class, and per split and group."""
        p = self.prompts
        out: dict[str, Any] = {"name": p.name, "mode": self.mode, "n": int(len(self.train) + len(self.val) + len(self.test)),
                               "fingerprint": p.fingerprint(), "label_names": list(p.label_names)}
        for which in SPLITS:
            idx = self.rows(which)
            labels = p.labels[idx].tolist()
            out[which] = {name: labels.count(k) for k, name in enumerate(p.label_names)}
            groups = [p.groups[i] for i in idx]
            out[f"{which}_groups"] = {g: groups.count(g) for g in sorted(set(groups))}
        return out


def _concat(a: PromptSet, b: PromptSet) -> PromptSet:
    return PromptSet(f"{a.name}+{b.name}", a.texts + b.texts, np.concatenate([a.labels, b.labels]), list(a.label_names),
                     a.groups + b.groups, a.splits + b.splits, a.ids + [f"test:{i}" for i in b.ids],
                     {"train_source": a.meta, "test_source": b.meta})


def _check_rows(split: BenchSplit) -> None:
    p = split.prompts
    k = len(p.label_names)
    for which in SPLITS:
        part = p.subset(split.rows(which), name=f"{p.name} ({which} rows)")
        if len(part) == 0:
            raise MechsafeError(f"the {which} split of {p.name} is empty; use a larger dataset or another ood split")
        part.require_classes(k)


def make_split(prompts: PromptSet, ood: OODSplit | None = None, test_prompts: PromptSet | None = None) -> BenchSplit:
    """Rows for training, validation and test (see the module docstring); raises on unusable splits."""
    prompts.require_classes(2)
    splits = np.asarray(prompts.splits)
    if ood is None:
        out = BenchSplit(prompts, *(np.flatnonzero(splits == s) for s in SPLITS), mode="in-distribution")
    elif ood.test_data is not None:
        if test_prompts is None:
            raise MechsafeError(f"ood test_data {ood.test_data!r} was not loaded; pass its PromptSet")
        if list(test_prompts.label_names) != list(prompts.label_names):
            raise MechsafeError(f"ood test_data classes {test_prompts.label_names} differ from the training data's "
                                f"{prompts.label_names}; map its labels to the same classes")
        seen = {t for t, s in zip(prompts.texts, prompts.splits) if s != "test"}
        test_part = test_prompts.split("test")
        keep = np.array([t not in seen for t in test_part.texts], dtype=bool)
        if not keep.all():
            logger.warning("dropping %d ood test prompts that also appear in the training data", int((~keep).sum()))
        test_part = test_part.subset(keep)
        both = _concat(prompts, test_part)
        n = len(prompts)
        out = BenchSplit(both, np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val"),
                         n + np.arange(len(test_part)), mode="ood-data")
    else:
        available = set(prompts.groups)
        unknown = sorted((set(ood.train_groups) | set(ood.test_groups)) - available)
        if unknown:
            raise MechsafeError(f"ood groups {unknown} are not in {prompts.name}; available groups: {sorted(available)}")
        groups = np.asarray(prompts.groups)
        in_train = np.isin(groups, ood.train_groups)
        in_test = np.isin(groups, ood.test_groups)
        test = in_test & (~in_train | (splits == "test"))
        out = BenchSplit(prompts, np.flatnonzero(in_train & (splits == "train")),
                         np.flatnonzero(in_train & (splits == "val")), np.flatnonzero(test), mode="ood-groups")
    _check_rows(out)
    return out
