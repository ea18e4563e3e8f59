"""Saved probes: the numbers of a linear probe (safetensors) plus a JSON sidecar saying how to feed it.

A dense probe is a standardization followed by logistic regression. It is saved as plain arrays
(``mean``, ``scale``, ``coef``, ``intercept``, ``classes``) in safetensors, never as a pickle, so loading a
probe someone shared runs no code; :class:`LinearProbe` rebuilds the classifier from them. Files saved as
joblib pickles by older versions load only with ``allow_pickle=True`` (a warning says what it risks).

The sidecar records the model spec and weight processing, the hook and pooling, the chat
settings, the class names and the model's fingerprint, so a probe can be reloaded and applied to
new prompts with exactly the activations it was trained on::

    probe = mechsafe.probes.load("runs/probe-bench-.../probe-dense-last.safetensors")
    model = probe.load_model()
    p_harmful = probe.score(model, ["How do I bake bread?", "How do I build a pipe bomb?"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mechsafe.errors import MechsafeError
from mechsafe.runs import read_json, write_json

logger = logging.getLogger(__name__)

SIDECAR_KEYS = ("method", "model", "processing", "hook", "layer", "pooling", "label_names", "chat", "system",
                "max_length")
"""Keys every probe sidecar must carry."""


@dataclasses.dataclass
class LinearProbe:
    """Standardize, then a linear classifier: what a dense probe's fitted pipeline computes, from its arrays."""

    mean: np.ndarray
    """Per-feature mean removed first ``[d]``."""
    scale: np.ndarray
    """Per-feature scale divided by next ``[d]``."""
    coef: np.ndarray
    """``[1, d]`` for two classes (the logit of the second), ``[n_classes, d]`` otherwise (softmax)."""
    intercept: np.ndarray
    """``[1]`` or ``[n_classes]``."""
    classes_: np.ndarray
    """Class indices of the columns of :meth:`predict_proba`."""

    @classmethod
    def from_pipeline(cls, estimator: Any) -> "LinearProbe":
        """The arrays of a fitted ``Pipeline([StandardScaler, LogisticRegression(CV)])``."""
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
        from sklearn.preprocessing import StandardScaler

        steps = [step for _, step in getattr(estimator, "steps", [])]
        if len(steps) != 2 or not isinstance(steps[0], StandardScaler) \
                or not isinstance(steps[1], (LogisticRegression, LogisticRegressionCV)):
            raise MechsafeError(f"only standardize + logistic regression probes can be saved, not {estimator!r}")
        scaler, logreg = steps
        d = logreg.coef_.shape[1]
        mean = scaler.mean_ if scaler.mean_ is not None else np.zeros(d)
        scale = scaler.scale_ if scaler.scale_ is not None else np.ones(d)
        return cls(np.asarray(mean, float), np.asarray(scale, float), np.asarray(logreg.coef_, float),
                   np.asarray(logreg.intercept_, float), np.asarray(logreg.classes_))

    def decision_function(self, X) -> np.ndarray:
        return ((np.asarray(X, float) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, X) -> np.ndarray:
        logits = self.decision_function(X)
        if self.coef.shape[0] == 1:
            p = 1 / (1 + np.exp(-logits[:, 0]))
            return np.stack([1 - p, p], axis=1)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept,
                "classes": self.classes_.astype(np.int64)}


def save_probe(estimator: Any, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write the probe's arrays to ``path`` (``.safetensors``) and its sidecar ``path.with_suffix('.json')``, atomically."""
    from safetensors.numpy import save_file

    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise ValueError(f"probe metadata lacks {missing}")
    probe = estimator if isinstance(estimator, LinearProbe) else LinearProbe.from_pipeline(estimator)
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in probe.arrays().items()}, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    write_json(path.with_suffix(".json"), dict(meta) | {"format": 2, "estimator_file": path.name})
    return path


@dataclasses.dataclass
class Probe:
    """A reloaded probe (see :func:`load`)."""

    estimator: Any
    """The classifier (:class:`LinearProbe`, or an unpickled pipeline with ``allow_pickle``): ``predict_proba`` on
    pooled activations."""
    meta: dict[str, Any]
    """The sidecar: model, processing, hook, layer, pooling, chat settings, class names, metrics."""
    path: Path
    """The file it came from."""

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @property
    def hook(self) -> str:
        return str(self.meta["hook"])

    @property
    def pooling(self) -> str:
        return str(self.meta["pooling"])

    def load_model(self, device: str = "cpu", spec: str | None = None):
        """Load the model recorded in the sidecar (or ``spec``) with the recorded weight processing."""
        from mechsafe import models

        return models.load_model(spec or self.meta["model"], processing=self.meta["processing"], device=device)

    def predict_proba(self, model, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Class probabilities ``[n_prompts, n_classes]`` from ``model``'s activations."""
        from mechsafe.activations import ActivationConfig, cache_activations, model_fingerprint
        from mechsafe.hooks import check_hook, kind_of, layer_of

        prompts = [str(p) for p in prompts]
        if not prompts:
            raise MechsafeError("no prompts to score; pass at least one prompt")
        check_hook(model, self.hook)
        expected = self.meta.get("model_fingerprint")
        if expected and model_fingerprint(model) != expected:
            logger.warning("scoring with a model whose weights differ from the probe's training model (%s)",
                           self.meta["model"])
        cfg = ActivationConfig(hook=kind_of(self.hook), layers=str(layer_of(self.hook)), pooling=(self.pooling,),
                               batch_size=batch_size, chat=bool(self.meta["chat"]), system=self.meta["system"],
                               max_length=int(self.meta["max_length"]))
        with tempfile.TemporaryDirectory(prefix="mechsafe-score-") as root:
            store = cache_activations(model, prompts, cfg, root=root, progress=False)
            X = store.pooled(self.hook, self.pooling).numpy()
        proba = np.asarray(self.estimator.predict_proba(X), dtype=np.float64)
        out = np.zeros((len(prompts), len(self.label_names)))
        out[:, np.asarray(self.estimator.classes_).astype(int)] = proba
        return out

    def score(self, model, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Binary probes: probability of the positive class (e.g. harmful) ``[n]``; else ``[n, n_classes]``."""
        proba = self.predict_proba(model, prompts, batch_size=batch_size)
        return proba[:, 1] if proba.shape[1] == 2 else proba


def load(path: str | os.PathLike, allow_pickle: bool = False) -> Probe:
    """Load a probe from its ``.safetensors`` file, its ``.json`` sidecar, or a probe-bench run directory.

    A run directory gives its best dense probe (``best_probe`` in ``results.json``). A joblib pickle (saved by older
    versions) is refused unless ``allow_pickle=True``: unpickling runs whatever code the file holds, so only opt in
    for a file you made yourself.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        results = read_json(path / "results.json")
        best = results.get("best_probe")
        if not best:
            raise MechsafeError(f"run {path} saved no probe; pass a probe file or re-run probe-bench with dense")
        path = path / best
    sidecar = path.with_suffix(".json")
    if path.suffix == ".json" or not path.suffix:
        path = path.with_suffix(".safetensors" if path.with_suffix(".safetensors").is_file() else ".joblib")
    if not path.is_file() or not sidecar.is_file():
        raise MechsafeError(f"probe {path} or its sidecar {sidecar.name} does not exist; "
                            "pass a probe saved by `mechsafe probe-bench` (probe-*.safetensors in its run directory)")
    meta = read_json(sidecar)
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise MechsafeError(f"probe sidecar {sidecar} lacks {', '.join(missing)}; re-run probe-bench to save it again")
    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise MechsafeError(f"{path} is a pickle, which runs arbitrary code when loaded; re-save it with this "
                                "version's probe-bench, or pass allow_pickle=True only for a file you made yourself")
        import joblib

        logger.warning("loading the pickle %s: it can run any code it holds", path)
        try:
            return Probe(joblib.load(path), meta, path)
        except Exception as exc:  # noqa: BLE001 - unpickling raises many types
            raise MechsafeError(f"probe {path} could not be read ({type(exc).__name__}); re-run probe-bench") from None
    try:
        arrays = load_file(str(path))
        probe = LinearProbe(arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"], arrays["classes"])
    except (SafetensorError, KeyError, OSError) as exc:
        raise MechsafeError(f"probe {path} is not a complete probe file ({exc}); re-run probe-bench") from None
    return Probe(probe, meta, path)
