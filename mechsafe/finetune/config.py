"""``FinetuneConfig``: what the trainer trains (LoRA adapters, all weights or selected weights) and how."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mechsafe.errors import MechsafeError
from mechsafe.weights import check_kinds

METHODS = ("lora", "full", "selected")
"""What trains: LoRA adapters on the targets, every parameter of the model, or the target weights themselves."""
SCHEDULES = ("constant", "linear")
PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning of a ``HookedTransformer`` against a list of objectives (:mod:`mechsafe.finetune.objectives`).

    Example::

        cfg = FinetuneConfig(rank=8, alpha=16, targets=("mlp.W_in", "mlp.W_out", "attn.W_O"),
                             layers="middle", lr=3e-4, steps=40, batch_size=8)
        cfg = FinetuneConfig(method="selected", targets=("mlp.W_out",), layers="20-29", lr=1e-5, steps=40)
    """

    method: str = "lora"
    """What trains: ``lora`` (adapters on ``targets`` x ``layers``), ``full`` (every parameter of the model:
    embeddings, norms, every block weight and bias, unembedding) or ``selected`` (the ``targets`` x ``layers``
    weights themselves, selected by :func:`mechsafe.weights.select`)."""
    rank: int = 8
    """LoRA rank ``r`` of every adapted weight (for attention weights: of the whole
    ``d_model x (n_heads d_head)`` map, as LoRA on a Hugging Face ``q_proj``/``o_proj``)."""
    alpha: float = 16.0
    """LoRA scale numerator: the update is ``(alpha / rank) * B @ A``."""
    dropout: float = 0.0
    """LoRA dropout: the probability of dropping an input element of the low-rank branch
    ``scale * (x @ A.T) @ B.T`` while training (0: off; the frozen weight always sees the whole input)."""
    targets: tuple[str, ...] = ("mlp.W_in", "mlp.W_out", "attn.W_Q", "attn.W_O")
    """Weight kinds to adapt (``lora``) or train (``selected``), as :data:`mechsafe.weights.WEIGHT_KINDS`:
    ``mlp.W_in``, ``mlp.W_gate``, ``mlp.W_out``, ``attn.W_Q``, ``attn.W_K``, ``attn.W_V``, ``attn.W_O``
    (``W_K``/``W_V`` are the grouped ``_W_K``/``_W_V`` of grouped-query attention). Unused by ``full``."""
    layers: str = "all"
    """Blocks of the targets: a layer selector (``all``, ``early``, ``middle``, ``late``, ``last``, ``3-7``, ``0,5,9``)."""
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    steps: int | None = None
    """Optimizer steps to train; give either ``steps`` or ``epochs`` (neither: one epoch)."""
    epochs: float | None = None
    """Passes over the examples (fractional allowed); converted to steps, rounded up."""
    batch_size: int = 8
    """Examples per forward pass (micro-batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the token-weighted mean over all of them."""
    max_length: int = 256
    """Longest teacher-forced sequence in tokens (prompt + response); longer responses are cut."""
    seed: int = 0
    """Seed of the LoRA initialization and of the example order."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the end) when a run dir is given; 0: only at the end."""
    weight_decay: float = 0.0
    """AdamW weight decay on the trained parameters (LoRA factors or weights; never on frozen entries, see
    :class:`~mechsafe.finetune.transforms.Freeze`)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0."""
    schedule: str = "constant"
    """Learning rate after warm-up: ``constant`` or ``linear`` decay to 0 at the last step."""
    max_grad_norm: float | None = 1.0
    """Clip the gradients of the trained parameters to this global norm; ``None`` disables clipping."""
    callback_every: int = 1
    """Call ``callback(step, model)`` every this many steps (also before the first and after the last)."""
    merge: bool = True
    """``lora``: merge the adapters into the weights at the end (a plain ``HookedTransformer``); False keeps the
    PEFT wrappers."""
    precision: str = "float32"
    """``bfloat16``: mixed precision, the training forward passes run under ``torch.autocast`` with bfloat16
    matrix products (faster where matrix products dominate a step, on CPUs with AMX or AVX512-BF16 and on
    recent GPUs; ``docs/finetune.md`` gives measured gains); the weights, LoRA factors,
    optimizer state, losses and the objectives' reference passes stay float32.
    ``float32``: everything in float32."""
    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch once and continue every row that shares it (the example's
    response, its negative, its rejected response) from the prompt's cached keys and values
    (:func:`mechsafe.forward.shared_prompt_resid`): the same losses and gradients up to floating-point
    summation order, with fewer tokens computed. ``False``: one full pass for the examples and one for their
    alternative responses."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MechsafeError(f"unknown fine-tuning method {self.method!r}; choose one of {', '.join(METHODS)}")
        self.targets = check_kinds(self.targets)
        for name in ("rank", "batch_size", "grad_accum", "max_length", "callback_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")
        for name in ("checkpoint_every", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MechsafeError(f"{name}={value!r} must be a non-negative integer")
        if not 0 <= self.dropout < 1:
            raise MechsafeError(f"dropout={self.dropout} must be in [0, 1) (0 turns LoRA dropout off)")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise MechsafeError(f"alpha={self.alpha} must be a positive number")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MechsafeError(f"lr={self.lr} must be a positive number, e.g. 2e-4")
        if self.weight_decay < 0:
            raise MechsafeError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.steps is not None and self.epochs is not None:
            raise MechsafeError("give either steps or epochs, not both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise MechsafeError(f"steps={self.steps!r} must be a positive integer")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise MechsafeError(f"epochs={self.epochs} must be a positive number")
        if self.precision not in PRECISIONS:
            raise MechsafeError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise MechsafeError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise MechsafeError(f"max_grad_norm={self.max_grad_norm} must be positive (or None to disable clipping)")
        if not isinstance(self.layers, str):
            self.layers = ",".join(str(i) for i in self.layers) if not isinstance(self.layers, int) else str(self.layers)

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps for ``n_examples`` training pairs."""
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil((self.epochs or 1.0) * n_examples / per_step))

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) out of ``total``."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "linear":
            span = max(1, total - self.warmup_steps)
            return self.lr * max(0.0, 1 - (step - self.warmup_steps) / span)
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
