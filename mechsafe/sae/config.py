"""Training configuration of an SAE and the YAML recipes that hold it.

A recipe (``sae/*.yaml``) is a mapping of :class:`SAETrainConfig` fields; command-line or keyword
overrides replace single fields::

    cfg = load_recipe("sae/smollm2-resid-mid.yaml", layer=12, training_tokens=100_000)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from mechsafe.errors import MechsafeError, check_keys
from mechsafe.presets import read_preset
from mechsafe.hooks import check_kind

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
"""SAE-Lens training architectures mechsafe exposes (``standard`` is ReLU with an L1 penalty)."""

ROUTES = ("cache", "runner")
NORMALIZATIONS = ("none", "expected_average_only_in")
LR_SCHEDULERS = ("constant", "cosineannealing")


@dataclasses.dataclass
class SAETrainConfig:
    """Everything that defines one SAE training run (architecture, data, optimisation, evaluation)."""

    model: str = "smollm2-135m-instruct"
    """Model spec for ``mechsafe.load_model`` (used by the CLI; the Python API takes a loaded model)."""
    processing: str = "none"
    """Weight processing at load time (``none`` or ``fold``); recorded with the SAE."""
    hook: str = "resid_post"
    """Hook kind (see ``mechsafe.hooks.HOOK_KINDS``)."""
    layer: int = 15
    """Block index of the hook (negative counts from the end)."""
    architecture: str = "topk"
    """SAE-Lens architecture: ``standard`` (ReLU + L1), ``topk``, ``batchtopk`` or ``jumprelu``."""
    expansion_factor: int = 4
    """Width of the SAE as a multiple of the hook's dimension (d_sae = expansion_factor * d_in)."""
    k: int = 64
    """Active latents per token for ``topk``; mean active latents per token for ``batchtopk``."""
    l1_coefficient: float = 5.0
    """L1 penalty weight for ``standard``."""
    l0_coefficient: float = 1.0
    """L0 (step) penalty weight for ``jumprelu``."""
    jumprelu_init_threshold: float = 0.01
    """Initial JumpReLU threshold."""
    jumprelu_bandwidth: float = 0.05
    """Bandwidth of the JumpReLU straight-through estimator."""
    sparsity_warm_up_steps: int = 0
    """Steps over which the L1 / L0 penalty ramps up from zero (``standard`` and ``jumprelu``)."""
    normalize_activations: str = "expected_average_only_in"
    """``expected_average_only_in`` rescales inputs to mean norm sqrt(d_in) while training (folded into
    the saved weights) or ``none``."""
    init_b_dec: str = "mean"
    """Initial decoder bias: ``mean`` (mean of the training activations) or ``zero`` (SAE-Lens's default)."""
    training_tokens: int = 300_000
    """Token activations the SAE sees in total; epochs over the cached pool = training_tokens / pool size."""
    batch_size: int = 512
    """Token activations per optimisation step."""
    lr: float = 1e-3
    """Adam learning rate."""
    lr_scheduler: str = "cosineannealing"
    """``constant`` or ``cosineannealing`` (decays to lr / 10 over training)."""
    lr_warm_up_steps: int = 20
    """Linear learning-rate warm-up steps."""
    seed: int = 0
    """Seed for the SAE initialisation and the per-epoch shuffles."""
    source: str = "bundled"
    """Training text: ``bundled`` (train/val prompts of the bundled suites), a Hugging Face dataset name,
    a local ``.txt`` (one text per line) or ``.jsonl`` file, or ``store:PATH`` (an activation store with
    the ``tokens`` pooling at this hook)."""
    text_column: str = "text"
    """Column of the texts in a ``.jsonl`` file or hub dataset."""
    max_texts: int | None = None
    """Use at most this many training texts (``None``: all)."""
    extra_texts: bool = True
    """With ``source: bundled``: also train on the bundled instructions, their answers, math questions,
    refusals and compliant responses (each as a user turn) to widen the token pool."""
    chat: bool = True
    """Wrap training texts in the model's chat template, as probes and evaluation do."""
    max_length: int = 256
    """Longest training text in tokens."""
    eval_data: str = "harmful_vs_harmless"
    """Prompt set (``mechsafe.data.load`` source) whose ``eval_split`` is the held-out evaluation set."""
    eval_split: str = "test"
    """Split of ``eval_data`` used for evaluation; never trained on."""
    eval_max_prompts: int | None = None
    """Evaluate on at most this many held-out prompts (``None``: all)."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of evaluation tokens counts as dense."""
    route: str = "cache"
    """``cache``: cache per-token activations once, then train SAE-Lens's ``SAETrainer`` from them (fast on
    CPU); ``runner``: SAE-Lens's ``LanguageModelSAETrainingRunner`` streaming a hub dataset (for large data)."""
    context_size: int = 128
    """Tokens per sequence for the ``runner`` route."""
    device: str = "cpu"
    """Device of the SAE while training."""

    def __post_init__(self) -> None:
        check_kind(self.hook)
        if self.architecture not in ARCHITECTURES:
            raise MechsafeError(f"unknown SAE architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.processing not in ("none", "fold"):
            raise MechsafeError(f"unknown weight processing {self.processing!r}; use none or fold")
        if self.route not in ROUTES:
            raise MechsafeError(f"unknown training route {self.route!r}; use {' or '.join(ROUTES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise MechsafeError(f"unknown normalize_activations {self.normalize_activations!r}; use {' or '.join(NORMALIZATIONS)}")
        if self.init_b_dec not in ("mean", "zero"):
            raise MechsafeError(f"unknown init_b_dec {self.init_b_dec!r}; use mean or zero")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise MechsafeError(f"unknown lr_scheduler {self.lr_scheduler!r}; use {' or '.join(LR_SCHEDULERS)}")
        for name in ("expansion_factor", "k", "training_tokens", "batch_size", "max_length", "context_size"):
            if int(getattr(self, name)) < 1:
                raise MechsafeError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.training_tokens < self.batch_size:
            raise MechsafeError(f"training_tokens ({self.training_tokens}) is less than one batch ({self.batch_size}); raise it")
        for name in ("lr", "l1_coefficient", "l0_coefficient", "jumprelu_bandwidth"):
            if not float(getattr(self, name)) > 0:
                raise MechsafeError(f"{name} must be positive (got {getattr(self, name)})")
        if self.lr_warm_up_steps < 0 or self.sparsity_warm_up_steps < 0:
            raise MechsafeError("warm-up steps must be non-negative")
        if not 0 < self.dense_threshold < 1:
            raise MechsafeError(f"dense_threshold must be in (0, 1) (got {self.dense_threshold})")
        if self.eval_split not in ("train", "val", "test"):
            raise MechsafeError(f"unknown eval_split {self.eval_split!r}; use train, val or test")
        if self.max_texts is not None and self.max_texts < 1:
            raise MechsafeError("max_texts must be at least 1 or null")
        if self.eval_max_prompts is not None and self.eval_max_prompts < 1:
            raise MechsafeError("eval_max_prompts must be at least 1 or null")

    @property
    def n_steps(self) -> int:
        """Optimisation steps (training tokens divided by the batch size)."""
        return self.training_tokens // self.batch_size


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type (``None`` / ``null`` stay ``None`` for optional fields)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in str(field.type)):
        return None
    typ = str(field.type)
    try:
        if typ.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if typ.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if typ.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise MechsafeError(f"SAE config field {field.name!r} needs a {typ} value (got {value!r})") from None


def make_config(values: Mapping[str, Any] | None = None, **overrides: Any) -> SAETrainConfig:
    """Build a validated config from a mapping of fields and keyword overrides (``None`` overrides are ignored)."""
    fields = {f.name: f for f in dataclasses.fields(SAETrainConfig)}
    merged = dict(values or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    check_keys(merged, fields, "SAE config field")
    return SAETrainConfig(**{k: _coerce(fields[k], v) for k, v in merged.items()})


def load_recipe(path: str | os.PathLike, **overrides: Any) -> SAETrainConfig:
    """Read a YAML recipe and apply keyword overrides."""
    return make_config(read_preset(path, "SAE recipe", "sae/smollm2-resid-mid.yaml"), **overrides)


def training_sae_config(config: SAETrainConfig, d_in: int, hook_name: str, model_name: str = ""):
    """The SAE-Lens ``TrainingSAEConfig`` of ``config`` for a hook of dimension ``d_in``."""
    from sae_lens.registry import get_sae_training_class

    _, cfg_cls = get_sae_training_class(config.architecture)
    kwargs: dict[str, Any] = dict(d_in=d_in, d_sae=config.expansion_factor * d_in, dtype="float32",
                                  device=config.device, normalize_activations=config.normalize_activations)
    if config.architecture == "standard":
        kwargs.update(l1_coefficient=config.l1_coefficient, l1_warm_up_steps=config.sparsity_warm_up_steps)
    elif config.architecture == "topk":
        kwargs.update(k=int(config.k))
    elif config.architecture == "batchtopk":
        kwargs.update(k=float(config.k))
    elif config.architecture == "jumprelu":
        kwargs.update(l0_coefficient=config.l0_coefficient, l0_warm_up_steps=config.sparsity_warm_up_steps,
                      jumprelu_init_threshold=config.jumprelu_init_threshold,
                      jumprelu_bandwidth=config.jumprelu_bandwidth)
    if config.k > kwargs["d_sae"] and config.architecture in ("topk", "batchtopk"):
        raise MechsafeError(f"k={config.k} exceeds the SAE width {kwargs['d_sae']}; lower k or raise expansion_factor")
    sae_cfg = cfg_cls(**kwargs)
    sae_cfg.metadata.hook_name = hook_name
    sae_cfg.metadata.model_name = model_name
    return sae_cfg
