"""Probe methods as :class:`Candidate` objects: features plus a recipe for a fresh estimator.

Every row of the benchmark table — a dense probe at one layer and pooling, the majority class,
TF-IDF on the raw text, an SAE-feature probe — is a ``Candidate``. The bench fits each one's
estimator on the training rows of its features and scores the validation and test rows with the
same code, so no method gets a different protocol.

Dense probe (per layer and pooling)::

    x -> StandardScaler -> LogisticRegression(C),   C chosen by stratified k-fold CV on train

TF-IDF baseline: word 1-2-gram TF-IDF (sublinear tf) of the raw prompt -> LogisticRegression(C),
C again chosen by CV on train. Majority baseline: ``DummyClassifier(strategy="prior")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from mechsafe.errors import MechsafeError


@dataclasses.dataclass
class Candidate:
    """One row of the benchmark: a method's features and how to build its estimator."""

    method: str
    """Method name, e.g. ``dense``, ``tfidf``, ``majority``, ``sae-k16``."""
    layer: int | None
    """Layer the features come from (``None`` for text and majority baselines)."""
    features: Any
    """``[n_prompts, n_features]`` array in PromptSet row order, or a list of texts for text baselines."""
    make_estimator: Callable[[int], Any]
    """``seed -> unfitted estimator`` with ``fit`` and ``predict_proba`` (sklearn API)."""
    pooling: str | None = None
    """Pooling of the activations (``last``/``mean``), ``None`` for text baselines."""

    @property
    def key(self) -> str:
        """The method as it appears in the table: ``method`` or ``method/pooling``."""
        return self.method if self.pooling is None else f"{self.method}/{self.pooling}"

    def n_rows(self) -> int:
        return len(self.features)

    def rows(self, index: np.ndarray) -> Any:
        """The features of the prompts at ``index``."""
        if isinstance(self.features, np.ndarray):
            return self.features[index]
        return [self.features[int(i)] for i in index]


def _cv(folds: int, seed: int):
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def _logistic_cv(cs: Sequence[float], folds: int, max_iter: int, n_classes: int, seed: int):
    from sklearn.linear_model import LogisticRegressionCV

    return LogisticRegressionCV(Cs=list(cs), l1_ratios=(0.0,), cv=_cv(folds, seed), solver="lbfgs",
                                scoring="roc_auc" if n_classes == 2 else "roc_auc_ovr", max_iter=max_iter,
                                random_state=seed, use_legacy_attributes=False)


def dense_estimator(cs: Sequence[float], folds: int, max_iter: int, n_classes: int) -> Callable[[int], Any]:
    """Standardize, then logistic regression with C chosen by stratified CV on the data it is fit on."""

    def make(seed: int):
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        return Pipeline([("scale", StandardScaler()), ("logreg", _logistic_cv(cs, folds, max_iter, n_classes, seed))])

    return make


def tfidf_estimator(cs: Sequence[float], folds: int, max_iter: int, n_classes: int) -> Callable[[int], Any]:
    """Word 1-2-gram TF-IDF of the raw text, then CV-tuned logistic regression (no model involved)."""

    def make(seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import Pipeline

        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
        return Pipeline([("tfidf", vec), ("logreg", _logistic_cv(cs, folds, max_iter, n_classes, seed))])

    return make


def majority_estimator() -> Callable[[int], Any]:
    """Predicts the training class frequencies for every prompt (AUROC 0.5 by construction)."""

    def make(seed: int):
        from sklearn.dummy import DummyClassifier

        return DummyClassifier(strategy="prior", random_state=seed)

    return make


def chosen_c(estimator: Any) -> float | None:
    """The regularization C a fitted estimator's cross-validation chose (``None`` if it has none)."""
    steps = [s for _, s in estimator.steps] if hasattr(estimator, "steps") else [estimator]
    for step in reversed(steps):
        c = getattr(step, "C_", None)
        if c is not None:
            return float(np.ravel(c)[0])
        best = getattr(step, "best_params_", None)
        if best:
            for key, value in best.items():
                if key.endswith("C"):
                    return float(value)
    return None


def dense_candidates(store, hooks: Sequence[str], poolings: Sequence[str], make: Callable[[int], Any]) -> list[Candidate]:
    """A dense candidate per hook (layer) and pooling, features read from an activation store."""
    from mechsafe.hooks import layer_of

    out = []
    for pooling in poolings:
        for hook in hooks:
            feats = store.pooled(hook, pooling).numpy()
            if not np.isfinite(feats).all():
                raise MechsafeError(f"activations at {hook} ({pooling}) contain NaN or inf; check the model's dtype")
            out.append(Candidate("dense", layer_of(hook), feats, make, pooling))
    return out


def baseline_candidates(texts: Sequence[str], methods: Sequence[str], tfidf: Callable[[int], Any]) -> list[Candidate]:
    """The model-free baselines named in ``methods`` (``majority``, ``tfidf``)."""
    out = []
    if "majority" in methods:
        out.append(Candidate("majority", None, np.zeros((len(texts), 1), dtype=np.float32), majority_estimator()))
    if "tfidf" in methods:
        out.append(Candidate("tfidf", None, list(texts), tfidf))
    return out
