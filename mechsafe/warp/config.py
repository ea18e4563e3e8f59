"""Settings of WaRP's three phases (:class:`WarpConfig`) and of the comparison against its peers
(:class:`CompareConfig`)."""

from __future__ import annotations

import dataclasses
import math

from mechsafe.errors import MechsafeError, closest
from mechsafe.hooks import parse_layers

LAYER_TYPES = {"ffn_down": ("mlp.W_out",), "ffn_up": ("mlp.W_in", "mlp.W_gate"), "ffn_gate": ("mlp.W_gate",),
               "attn_q": ("attn.W_Q",), "attn_k": ("attn.W_K",), "attn_v": ("attn.W_V",), "attn_o": ("attn.W_O",)}
"""The layer types of the safety port and the weight kinds they name: ``ffn_down`` (``W_out``, fed by the MLP
post-activation), ``ffn_up`` (``W_in`` and, in a gated MLP, ``W_gate``), ``ffn_gate`` (``W_gate`` alone: gated MLPs
only), ``attn_q``/``attn_k``/``attn_v`` (fed by the normalized residual), ``attn_o`` (fed by ``hook_z``)."""
BASES = ("covariance", "random", "identity")
LOSS_TOKENS = ("response", "sequence")
QUANTILES = ("global", "layer")
GRANULARITIES = ("element", "direction")
METHODS = ("full", "selected", "lora", "safelora", "original-mask", "warp")
"""The comparison's methods: every weight fine-tuned; the WaRP weights fine-tuned without a mask; LoRA; SafeLoRA;
the importance rule applied to the weights themselves (no rotation); WaRP at each keep ratio."""


def check_layer_types(types) -> tuple[str, ...]:
    types = (types,) if isinstance(types, str) else tuple(types)
    if not types:
        raise MechsafeError(f"no layer type given; choose from {', '.join(LAYER_TYPES)}")
    for t in types:
        if t not in LAYER_TYPES:
            raise MechsafeError(f"unknown layer type {t!r}{closest(t, LAYER_TYPES)}; choose from {', '.join(LAYER_TYPES)}")
    if len(set(types)) != len(types):
        raise MechsafeError(f"layer types {list(types)} repeat a type; list each once")
    return types


def check_keep_ratio(value: float, name: str = "keep_ratio") -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise MechsafeError(f"{name}={value:g} must be in (0, 1): the share of rotated coefficients to freeze, "
                            "e.g. 0.1")
    return value


@dataclasses.dataclass
class WarpConfig:
    """What WaRP protects and how (``mechsafe warp basis|importance|train``).

    Where the safety port's paper and code disagree the paper's choice is the default and the code's an option:
    ``loss_tokens`` (refusal tokens / whole sequence), ``granularity`` (element / direction: the code's per-column
    choice) and ``quantile`` (WaRP's one global quantile / the code's per-layer choice).
    """

    layer_types: tuple[str, ...] = ("ffn_down",)
    """Weights to protect, as layer types: ``ffn_down``, ``ffn_up``, ``ffn_gate``, ``attn_q``, ``attn_k``,
    ``attn_v``, ``attn_o`` (comma list)."""
    layers: str = "all"
    """Blocks of those weights: ``all``, ``early``, ``middle``, ``late``, ``last``, a range ``3-7`` or a list ``0,5,9``."""
    data: str = "safety"
    """Safety data of phases 1 and 2: ``safety`` (the bundled harmful training prompts with refusals, see
    ``responses``) or a local .jsonl/.csv/.parquet file / hub dataset with ``prompt``/``response`` columns."""
    responses: str = "own"
    """Refusals of the bundled data: ``own`` (the model's own greedy refusals, cached; the SNIP scoring data) or
    ``bundled`` (the bundled refusal texts)."""
    n_samples: int = 128
    """(prompt, refusal) pairs used (fewer when the data has fewer)."""
    batch_size: int = 8
    """Pairs per forward pass (phase 1) and per importance batch (phase 2: ``|∂L/∂W̃|`` is taken per batch)."""
    max_length: int = 256
    """Longest sequence in tokens (prompt + refusal)."""
    basis: str = "covariance"
    """``covariance``: eigenvectors of the input covariance (WaRP); ``random``: a seeded random orthonormal basis
    (the port's ablation); ``identity``: no rotation (masks on the weights themselves)."""
    keep_ratio: float = 0.1
    """Share of rotated coefficients frozen (the most important), in (0, 1)."""
    loss_tokens: str = "response"
    """Importance loss: NLL of the refusal tokens (``response``, the paper) or of the whole sequence (``sequence``,
    the port's code)."""
    quantile: str = "global"
    """Mask threshold: one quantile over every protected weight (``global``, WaRP) or one per weight (``layer``)."""
    granularity: str = "element"
    """Masked unit: each coefficient (``element``, the paper) or whole basis directions, a column of ``W̃`` ranked by
    its summed importance (``direction``, the port's code)."""
    checkpoint_every: int = 8
    """Phase 2 saves its partial sums every this many batches (a killed run resumes at the next batch)."""
    seed: int = 0
    """Seed of the choice of pairs and of the random basis."""

    def __post_init__(self) -> None:
        self.layer_types = check_layer_types(self.layer_types)
        if not isinstance(self.layers, str):
            self.layers = ",".join(str(i) for i in self.layers) if not isinstance(self.layers, int) else str(self.layers)
        parse_layers(self.layers, 10_000)  # syntax only; the model checks the range
        self.keep_ratio = check_keep_ratio(self.keep_ratio)
        for name, value, allowed in (("basis", self.basis, BASES), ("loss_tokens", self.loss_tokens, LOSS_TOKENS),
                                     ("quantile", self.quantile, QUANTILES),
                                     ("granularity", self.granularity, GRANULARITIES),
                                     ("responses", self.responses, ("own", "bundled"))):
            if value not in allowed:
                raise MechsafeError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        for name in ("n_samples", "batch_size", "max_length", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")

    def kinds(self) -> tuple[str, ...]:
        """The weight kinds of ``layer_types`` (in order, each once)."""
        return tuple(dict.fromkeys(k for t in self.layer_types for k in LAYER_TYPES[t]))


@dataclasses.dataclass
class CompareConfig:
    """The comparison of WaRP against its peers (``mechsafe warp compare``): one utility fine-tune per method on the
    same data, steps and batches, then refusal, over-refusal, utility and the attack bench's fine-tuning attack."""

    methods: tuple[str, ...] = METHODS
    """Methods compared: ``full``, ``selected``, ``lora``, ``safelora``, ``original-mask``, ``warp``."""
    keep_ratios: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5)
    """WaRP's keep ratios (``original-mask`` uses the WarpConfig's ``keep_ratio``)."""
    task: str = "arithmetic"
    """Utility task: ``arithmetic`` (the generated word problems), ``openai/gsm8k`` (hub) or a local
    .jsonl/.csv/.parquet file with ``question`` and ``answer`` columns (GSM8K's layout; the answer after ``####``)."""
    n_train: int = 1000
    """Training problems (drawn per run from the task's train split)."""
    n_test: int = 100
    """Held-out problems of the utility evaluation."""
    steps: int = 20
    """Optimizer steps of every method's fine-tune."""
    batch_size: int = 8
    """Problems per optimizer step."""
    lr: float = 5e-5
    """Learning rate of the weight-space methods (``full``, ``selected``, ``original-mask``, ``warp``)."""
    lora_lr: float = 5e-4
    """Learning rate of ``lora`` and ``safelora``."""
    lora_rank: int = 8
    """LoRA rank of ``lora`` and ``safelora`` (targets: the trainer's defaults in every block)."""
    safelora_threshold: float = 0.5
    """SafeLoRA projects a module's update when its cosine with its projection is below this."""
    safelora_projector: str = "approx"
    """SafeLoRA's projector: ``approx`` (``V Vᵀ / ‖V‖_F``, the reference code) or ``exact`` (onto V's column space)."""
    eval_limit: int = 48
    """Held-out harmful and harmless prompts of the refusal and over-refusal evaluation (``0``: all)."""
    max_new_tokens: int = 32
    """Tokens generated per response of the refusal evaluation."""
    answer_tokens: int = 40
    """Tokens generated per arithmetic answer."""
    attack: bool = True
    """Run the attack bench's harmful LoRA fine-tuning attack on every fine-tuned model."""
    attack_lr: float = 1e-3
    """Learning rate of that attack."""
    attack_steps: int = 15
    """Most steps of that attack (evaluated every ``attack_every``; it stops at the first break)."""
    attack_every: int = 5
    """Evaluate the attack every this many steps."""
    attack_examples: int = 10
    """Harmful pairs the attack trains on."""
    seed: int = 0
    """Seed of the training problems' order, LoRA initialization, evaluation subsets and intervals."""

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        for m in self.methods:
            if m not in METHODS:
                raise MechsafeError(f"unknown method {m!r}{closest(m, METHODS)}; choose from {', '.join(METHODS)}")
        if not self.methods:
            raise MechsafeError(f"no method given; choose from {', '.join(METHODS)}")
        self.keep_ratios = tuple(check_keep_ratio(v, "keep_ratios") for v in self.keep_ratios)
        if "warp" in self.methods and not self.keep_ratios:
            raise MechsafeError("warp needs at least one keep ratio (keep_ratios)")
        for name in ("n_train", "n_test", "steps", "batch_size", "lora_rank", "max_new_tokens", "answer_tokens",
                     "attack_steps", "attack_every", "attack_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.eval_limit, int) or self.eval_limit < 0:
            raise MechsafeError(f"eval_limit={self.eval_limit!r} must be a non-negative integer (0: all prompts)")
        for name in ("lr", "lora_lr", "attack_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise MechsafeError(f"{name}={getattr(self, name)} must be a positive number")
        if not 0 < self.safelora_threshold <= 1:
            raise MechsafeError(f"safelora_threshold={self.safelora_threshold} must be in (0, 1]")
        if self.safelora_projector not in ("approx", "exact"):
            raise MechsafeError(f"unknown safelora_projector {self.safelora_projector!r}; use approx or exact")
