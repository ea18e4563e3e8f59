"""The probe benchmark's configuration: a dataclass, loaded from a YAML/TOML preset plus overrides.

A preset is a flat mapping whose keys are the fields of :class:`ProbeBenchConfig` (``ood`` is a
nested mapping with the fields of :class:`OODSplit`). Unknown keys are rejected, so a typo in a
preset fails at once instead of silently running the default::

    cfg = load_config("probes/harmful_vs_harmless.yaml", layers="10-20", seed=1)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from mechsafe.errors import MechsafeError, check_keys
from mechsafe.presets import read_preset
from mechsafe.hooks import check_kind

METHODS = ("dense", "majority", "tfidf")
"""Built-in methods: per-layer dense logistic probes, the majority class, TF-IDF on the raw text."""

PROBE_POOLINGS = ("last", "mean")
"""Poolings a probe can read (``tokens`` is for SAE training, not for probes)."""

SELECT_METRICS = ("auroc", "accuracy", "f1")
"""Validation metrics that can pick the best layer of a method."""


@dataclasses.dataclass
class OODSplit:
    """An out-of-distribution split: train/validate on some groups (or one dataset), test on others."""

    train_groups: list[str] = dataclasses.field(default_factory=list)
    """Groups whose ``train``/``val`` prompts train and validate the probes."""
    test_groups: list[str] = dataclasses.field(default_factory=list)
    """Groups tested on. A group only listed here contributes all its prompts (none was trained on);
    a group in both lists contributes only its ``test`` split."""
    test_data: str | None = None
    """Instead of groups: another dataset whose ``test`` split is the test set (same classes)."""

    def __post_init__(self) -> None:
        for name in ("train_groups", "test_groups"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(self, name, [str(v) for v in value])
        if self.test_data is not None:
            if self.train_groups or self.test_groups:
                raise MechsafeError("ood takes either test_data or train_groups/test_groups, not both; drop one")
            return
        if not self.train_groups or not self.test_groups:
            raise MechsafeError("ood needs both train_groups and test_groups (or test_data); "
                                "e.g. ood: {train_groups: [a, b, harmless], test_groups: [c, harmless]}")
        if set(self.test_groups) <= set(self.train_groups):
            raise MechsafeError("ood test_groups are all training groups, so the test is not out of distribution; "
                                "list at least one group that is not in train_groups")


@dataclasses.dataclass
class ProbeBenchConfig:
    """Everything that defines one probe benchmark run (recorded in its ``run.json``)."""

    data: str = "harmful_vs_harmless"
    """Bundled suite name, Hugging Face dataset name, or local .jsonl/.csv/.parquet file."""
    text_column: str | None = None
    """Text column of a local file or hub dataset."""
    label_column: str | None = None
    """Label column of a local file or hub dataset."""
    label_map: dict[str, Any] | None = None
    """Maps raw labels to classes; rows with other labels are dropped."""
    group_column: str | None = None
    """Column used as the group (for out-of-distribution splits)."""
    model: str = "smollm2-135m-instruct"
    """Model spec for :func:`mechsafe.load_model`."""
    processing: str = "none"
    """Weight processing at load time: ``none`` or ``fold``."""
    device: str = "cpu"
    """Torch device for the forward passes."""
    hook: str = "resid_post"
    """Hook kind the probes read (see ``mechsafe.hooks.HOOK_KINDS``)."""
    layers: str = "all"
    """Layer selector: ``all``, ``early``, ``middle``, ``late``, ``last``, ``3-7`` or ``0,5,9``."""
    pooling: list[str] = dataclasses.field(default_factory=lambda: ["last", "mean"])
    """Poolings probed: ``last`` (post-instruction token) and/or ``mean`` (over the user's text)."""
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    """Methods in the table: any of ``dense``, ``majority``, ``tfidf``."""
    cs: list[float] = dataclasses.field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])
    """Inverse regularization strengths the dense probe's cross-validation chooses from."""
    tfidf_cs: list[float] = dataclasses.field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])
    """Inverse regularization strengths the TF-IDF baseline's cross-validation chooses from."""
    cv_folds: int = 3
    """Stratified folds of the training split used to choose C."""
    max_iter: int = 500
    """Iteration cap of the lbfgs solver."""
    select_by: str = "auroc"
    """Validation metric that picks each method's best layer: ``auroc``, ``accuracy`` or ``f1``."""
    n_boot: int = 1000
    """Bootstrap resamples for every confidence interval."""
    ci_level: float = 0.95
    """Coverage of the confidence intervals."""
    seed: int = 0
    """Seed of the CV folds, solvers and bootstrap."""
    ood: OODSplit | None = None
    """Out-of-distribution split (``None``: the dataset's own train/val/test splits)."""
    sae: str | None = None
    """Path of a saved SAE: adds SAE-feature probes (needs ``mechsafe.sae``)."""
    sae_ks: list[int] = dataclasses.field(default_factory=lambda: [1, 16, 64])
    """Numbers of SAE features the k-sparse SAE probes keep."""
    chat: bool = True
    """Wrap prompts in the model's chat template before reading activations."""
    system: str | None = None
    """System message for the chat template (``None``: the template's default)."""
    max_length: int = 512
    """Longest prompt in tokens."""
    batch_size: int = 16
    """Prompts per forward pass."""
    activation_root: str | None = None
    """Folder of activation stores (``None``: ``$MECHSAFE_CACHE/activations``)."""
    name: str | None = None
    """A label for the run (defaults to the preset's file name); appears in the run directory name."""

    def __post_init__(self) -> None:
        from mechsafe.models import PROCESSING

        if not str(self.data).strip():
            raise MechsafeError("data is empty; name a bundled suite, a hub dataset or a local file")
        if self.processing not in PROCESSING:
            raise MechsafeError(f"unknown processing {self.processing!r}; use {' or '.join(PROCESSING)}")
        check_kind(self.hook)
        if isinstance(self.layers, (list, tuple)):
            self.layers = ",".join(str(int(x)) for x in self.layers)
        self.layers = str(self.layers)
        self.pooling = _as_list(self.pooling, str)
        bad = [p for p in self.pooling if p not in PROBE_POOLINGS]
        if bad or not self.pooling:
            raise MechsafeError(f"unknown pooling {bad or self.pooling}; choose from {', '.join(PROBE_POOLINGS)}")
        self.methods = _as_list(self.methods, str)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise MechsafeError(f"unknown method {bad or self.methods}; choose from {', '.join(METHODS)} "
                                "(SAE probes are added by setting sae: PATH)")
        self.cs = _as_list(self.cs, float)
        self.tfidf_cs = _as_list(self.tfidf_cs, float)
        for name in ("cs", "tfidf_cs"):
            values = getattr(self, name)
            if not values or min(values) <= 0:
                raise MechsafeError(f"{name} must be a non-empty list of positive numbers (got {values})")
        self.sae_ks = _as_list(self.sae_ks, int)
        if not self.sae_ks or min(self.sae_ks) < 1:
            raise MechsafeError(f"sae_ks must be a non-empty list of positive integers (got {self.sae_ks})")
        for name, low in (("cv_folds", 2), ("max_iter", 1), ("n_boot", 1), ("max_length", 1), ("batch_size", 1)):
            value = int(getattr(self, name))
            if value < low:
                raise MechsafeError(f"{name} must be at least {low} (got {value})")
            setattr(self, name, value)
        self.seed = int(self.seed)
        if not 0.5 <= float(self.ci_level) < 1:
            raise MechsafeError(f"ci_level must be in [0.5, 1) (got {self.ci_level})")
        if self.select_by not in SELECT_METRICS:
            raise MechsafeError(f"unknown select_by {self.select_by!r}; choose from {', '.join(SELECT_METRICS)}")
        if isinstance(self.ood, Mapping):
            _check_keys(self.ood, OODSplit, "ood")
            self.ood = OODSplit(**self.ood)
        if self.ood is not None and not isinstance(self.ood, OODSplit):
            raise MechsafeError("ood must be a mapping with train_groups/test_groups or test_data")
        if self.label_map is not None and (not isinstance(self.label_map, Mapping) or not self.label_map):
            raise MechsafeError("label_map must be a non-empty mapping, e.g. {unsafe: 1, safe: 0}")
        if self.sae is not None and not Path(self.sae).exists():
            raise MechsafeError(f"SAE path {self.sae} does not exist; train one with `mechsafe sae train` or fix the path")

    def data_kwargs(self) -> dict[str, Any]:
        """Column-mapping keyword arguments for :func:`mechsafe.data.load`."""
        kwargs = {k: getattr(self, k) for k in ("text_column", "label_column", "group_column", "label_map")}
        return {k: v for k, v in kwargs.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_list(value: Any, kind: type) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return [kind(v) for v in value]
    except (TypeError, ValueError):
        raise MechsafeError(f"{value!r} is not a list of {kind.__name__}; write e.g. a,b,c") from None


def field_names() -> list[str]:
    """The keys a preset may set."""
    return [f.name for f in dataclasses.fields(ProbeBenchConfig)]


def _check_keys(mapping: Mapping[str, Any], cls: type, where: str) -> None:
    check_keys(mapping, [f.name for f in dataclasses.fields(cls)], f"{where} key")


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ProbeBenchConfig:
    """A config from a preset file (optional) with keyword ``overrides`` applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_preset(path))
        values.setdefault("name", Path(path).stem)
    _check_keys(values, ProbeBenchConfig, "preset")
    _check_keys(overrides, ProbeBenchConfig, "override")
    values.update(overrides)
    try:
        return ProbeBenchConfig(**values)
    except TypeError as exc:
        raise MechsafeError(f"bad preset value ({exc}); check the types of the preset's fields") from None
