"""Saved probes: a fitted sklearn pipeline (joblib) plus a JSON sidecar saying how to feed it.

The sidecar records the model spec and weight processing, the hook and pooling, the chat
settings, the class names and the model's fingerprint, so a probe can be reloaded and applied to
new prompts with exactly the activations it was trained on::

    probe = mechsafe.probes.load("runs/probe-bench-.../probe-dense-last.joblib")
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


def save_probe(estimator: Any, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``path`` (``.joblib``) and its sidecar ``path.with_suffix('.json')`` atomically."""
    import joblib

    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise ValueError(f"probe metadata lacks {missing}")
    path = Path(path).with_suffix(".joblib")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        joblib.dump(estimator, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    write_json(path.with_suffix(".json"), dict(meta) | {"format": 1, "estimator_file": path.name})
    return path


@dataclasses.dataclass
class Probe:
    """A reloaded probe (see :func:`load`)."""

    estimator: Any
    """The fitted sklearn pipeline (``predict_proba`` on pooled activations)."""
    meta: dict[str, Any]
    """The sidecar: model, processing, hook, layer, pooling, chat settings, class names, metrics."""
    path: Path
    """The ``.joblib`` file it came from."""

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


def load(path: str | os.PathLike) -> Probe:
    """Load a probe from its ``.joblib`` file, its ``.json`` sidecar, or a probe-bench run directory.

    A run directory gives its best dense probe (``best_probe`` in ``results.json``).
    """
    import joblib

    path = Path(path)
    if path.is_dir():
        results = read_json(path / "results.json")
        best = results.get("best_probe")
        if not best:
            raise MechsafeError(f"run {path} saved no probe; pass a .joblib file or re-run probe-bench with dense")
        path = path / best
    path = path.with_suffix(".joblib")
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise MechsafeError(f"probe {path} or its sidecar {sidecar.name} does not exist; "
                            "pass a probe saved by `mechsafe probe-bench` (probe-*.joblib in its run directory)")
    meta = read_json(sidecar)
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise MechsafeError(f"probe sidecar {sidecar} lacks {', '.join(missing)}; re-run probe-bench to save it again")
    try:
        estimator = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise MechsafeError(f"probe {path} could not be read ({type(exc).__name__}); re-run probe-bench") from None
    return Probe(estimator, meta, path)
