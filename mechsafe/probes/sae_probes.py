"""SAE-feature probes that ``probe-bench`` compares with dense probes.

Probe methods (each a :class:`mechsafe.probes.Candidate`, scored by the bench like dense probes), on SAE latents
pooled per prompt by :func:`mechsafe.sae.sae_features`:

* ``sae_all`` — all latents -> StandardScaler -> logistic regression, C by CV on the training rows;
* ``sae_k{k}`` — k-sparse probe: :class:`TopKMeanDiff` keeps the k latents with the largest absolute
  class-mean difference *on the training rows the pipeline is fit on*, then the same logistic regression
  (Kantamneni et al., ICML 2025; the GDM 2025 negative results on harmful-intent probing);
* ``sae_binsum`` — binarized latents summed over the content tokens, then the same logistic regression
  (Gallifant et al., EMNLP 2025).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline
from transformer_lens import HookedTransformer

from mechsafe.data import PromptSet
from mechsafe.errors import MechsafeError
from mechsafe.hooks import layer_of
from mechsafe.probes.config import ProbeBenchConfig
from mechsafe.probes.methods import Candidate, dense_estimator
from mechsafe.sae.features import sae_features
from mechsafe.sae.load import as_loaded, load_sae

logger = logging.getLogger(__name__)

PROBE_METHODS = ("sae_all", "sae_k{k}", "sae_binsum")
"""Method names :func:`probe_candidates` returns (``{k}`` is each requested k)."""


class TopKMeanDiff(BaseEstimator, TransformerMixin):
    """Keep the ``k`` features whose class means differ most (absolute difference), chosen at ``fit``.

    Binary labels: |mean(X | y=1) − mean(X | y=0)|. More classes: the largest one-vs-rest difference
    |mean(X | y=c) − mean(X | y≠c)| over classes c. Inside a pipeline the choice sees only the rows the
    pipeline is fit on (the training split), never validation or test rows.
    """

    def __init__(self, k: int = 16):
        self.k = k

    def fit(self, X, y):
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise MechsafeError(f"TopKMeanDiff needs X [n, features] and y [n] (got {X.shape} and {y.shape})")
        if int(self.k) < 1:
            raise MechsafeError(f"TopKMeanDiff needs k >= 1 (got {self.k})")
        classes = np.unique(y)
        if len(classes) < 2:
            raise MechsafeError("TopKMeanDiff needs at least two classes in the training rows")
        if len(classes) == 2:
            score = np.abs(X[y == classes[1]].mean(0) - X[y == classes[0]].mean(0))
        else:
            score = np.max([np.abs(X[y == c].mean(0) - X[y != c].mean(0)) for c in classes], axis=0)
        k = min(int(self.k), X.shape[1])
        order = np.lexsort((np.arange(X.shape[1]), -score))  # largest score first, ties by index
        self.scores_ = score
        self.selected_ = np.sort(order[:k])
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        X = np.asarray(X)
        if X.shape[1] != self.n_features_in_:
            raise MechsafeError(f"TopKMeanDiff was fit on {self.n_features_in_} features, got {X.shape[1]}")
        return X[:, self.selected_]

    def get_support(self, indices: bool = False):
        if indices:
            return self.selected_.copy()
        mask = np.zeros(self.n_features_in_, dtype=bool)
        mask[self.selected_] = True
        return mask


def _estimators(n_classes: int, cs: Sequence[float] | None, cv_folds: int | None, max_iter: int | None) -> Callable[[int], Any]:
    """The dense probe's estimator (standardize + logistic regression, C by CV), shared for a fair comparison."""
    defaults = ProbeBenchConfig()
    return dense_estimator(list(cs or defaults.cs), int(cv_folds or defaults.cv_folds), int(max_iter or defaults.max_iter), n_classes)


def _k_sparse(make: Callable[[int], Any], k: int) -> Callable[[int], Any]:
    def build(seed: int):
        return Pipeline([("select", TopKMeanDiff(k))] + list(make(seed).steps))

    return build


def probe_candidates(model: HookedTransformer, prompts: PromptSet, sae_path: str | os.PathLike | None = None, *,
                     sae: Any = None, poolings: Sequence[str] = ("last", "mean"), ks: Sequence[int] = (1, 16, 64),
                     seed: int = 0, activation_root: str | os.PathLike | None = None, binsum: bool = True,
                     cs: Sequence[float] | None = None, cv_folds: int | None = None, max_iter: int | None = None,
                     chat_template: bool = True, system: str | None = None, max_length: int = 512,
                     progress: bool = False) -> list:
    """SAE-feature probe candidates for ``probe-bench`` (methods in the module docstring).

    Args:
        model: the model the SAE reads.
        prompts: labelled prompts; features are rows in its order.
        sae_path: a saved SAE (anything :func:`mechsafe.sae.load_sae` reads); or pass ``sae=``.
        poolings: poolings for ``sae_all`` and ``sae_k{k}`` (``last`` and/or ``mean``).
        ks: feature counts of the k-sparse probes.
        seed: recorded for reproducibility (the bench seeds each estimator itself).
        activation_root: activation-store root (reused across runs).
        binsum: add the ``sae_binsum`` candidate.
        cs, cv_folds, max_iter: logistic-regression grid; default to probe-bench's defaults.
    """
    if sae is None:
        if sae_path is None:
            raise MechsafeError("probe_candidates needs sae_path or sae; train one with `mechsafe sae train`")
        sae = load_sae(sae_path)
    loaded = as_loaded(sae)
    bad = [p for p in poolings if p not in ("last", "mean")]
    if bad:
        raise MechsafeError(f"SAE probe pooling {bad} is not supported; use last and/or mean")
    if not ks or min(int(k) for k in ks) < 1:
        raise MechsafeError(f"ks must be positive integers (got {list(ks)})")
    n_classes = len(prompts.label_names) if isinstance(prompts, PromptSet) else 2
    wanted = list(dict.fromkeys(list(poolings) + (["binsum"] if binsum else [])))
    feats = sae_features(model, loaded, prompts, poolings=wanted, activation_root=activation_root,
                         chat_template=chat_template, system=system, max_length=max_length, progress=progress)
    make = _estimators(n_classes, cs, cv_folds, max_iter)
    layer = layer_of(loaded.hook_name)
    out = []
    for pooling in poolings:
        out.append(Candidate("sae_all", layer, feats[pooling], make, pooling))
        for k in dict.fromkeys(int(k) for k in ks):
            out.append(Candidate(f"sae_k{k}", layer, feats[pooling], _k_sparse(make, k), pooling))
    if binsum:
        out.append(Candidate("sae_binsum", layer, feats["binsum"], make, "binsum"))
    logger.info("SAE probe candidates at %s (seed %d): %s", loaded.hook_name, seed, [c.key for c in out])
    return out
