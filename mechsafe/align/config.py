"""``AlignConfig``: the recipe of ``mechsafe align`` (data mix, objectives, LoRA, evaluation)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mechsafe.data import SPLITS
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig
from mechsafe.models import DEFAULT_MODEL


def default_finetune_config() -> FinetuneConfig:
    """The LoRA settings of the default recipe: rank 8 on the MLP weights and ``W_Q``/``W_O`` of layers 6-29,
    140 steps of 8 examples at a peak learning rate of 1e-3 with 4 warm-up steps and linear decay."""
    return FinetuneConfig(rank=8, alpha=16, targets=("mlp.W_in", "mlp.W_gate", "mlp.W_out", "attn.W_Q", "attn.W_O"),
                          layers="6-29", lr=1e-3, steps=140, batch_size=8, warmup_steps=4, schedule="linear",
                          max_length=128, checkpoint_every=10, seed=0)


@dataclasses.dataclass
class AlignConfig:
    """Settings of :func:`mechsafe.align.align` (the LoRA and optimizer settings live in ``finetune``)."""

    model: str = DEFAULT_MODEL
    """Base model spec (loaded with ``processing="none"``)."""
    finetune: FinetuneConfig = dataclasses.field(default_factory=default_finetune_config)
    """What trains and how (LoRA by default)."""
    answer_tokens: int = 24
    """Longest base-model answer (tokens) used as the target for a harmless training prompt (the opening of an
    answer carries the comply-or-refuse decision; longer targets mostly add noise and cost)."""
    harmful_limit: int | None = None
    """Use at most this many harmful TRAIN prompts (balanced over forms; None: all)."""
    harmless_limit: int | None = None
    """Use at most this many harmless TRAIN prompts (balanced over forms; None: all)."""
    answer_prompts: bool = True
    """Also teach the base model's answers to the bundled training-only harmless prompts
    (:func:`mechsafe.data.answer_prompts`: everyday, near-harm but benign and role-play requests)."""
    refusal_prompts: bool = True
    """Also teach refusals of the bundled training-only harmful requests (:func:`mechsafe.data.refusal_prompts`),
    after the harmful TRAIN prompts (``harmful_limit`` does not apply to them)."""
    negative_words: int = 1
    """Every harmless example gets the first this many words of a bundled refusal as its refusal opening: the
    unlikelihood negative and the preference term's rejected response (one word puts the pressure on the first
    token, where the comply-or-refuse decision is made)."""
    retain_weight: float = 1.0
    """Weight of the retain term (:class:`~mechsafe.finetune.RetainKL`) on the harmless examples; 0: off."""
    retain_top_k: int = 64
    """Reference tokens kept per position by the retain term (plus one bucket for the rest)."""
    unlikelihood_weight: float = 4.0
    """Weight of the unlikelihood term (:class:`~mechsafe.finetune.Unlikelihood`) of each harmless example's
    refusal opening; 0: off."""
    preference_weight: float = 4.0
    """Weight of the preference term (:class:`~mechsafe.finetune.Preference`): each harmful example's refusal over
    the base model's own answer, each harmless example's answer over its refusal opening; 0: off."""
    preference_beta: float = 0.1
    """DPO's ``beta``: the scale of the log-probability margin inside the sigmoid."""
    eval_split: str = "test"
    """Held-out split the report is computed on: ``test`` for the record, ``val`` while tuning."""
    eval_limit: int | None = None
    """Evaluate on at most this many prompts per pool (balanced over forms; None: all)."""
    eval_max_new_tokens: int = 48
    """Tokens generated per evaluation response."""
    utility: bool = True
    """Also measure arithmetic accuracy and reference-answer NLL (held-out bundled utility data)."""
    generate_batch_size: int = 32
    """Prompts per batch when generating."""
    seed: int = 0
    """Seed of the refusal assignment and of the prompt subsets."""

    def __post_init__(self) -> None:
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        if self.eval_split not in SPLITS or self.eval_split == "train":
            raise MechsafeError(f"eval_split={self.eval_split!r} must be 'val' or 'test' (held out from training)")
        for name in ("answer_tokens", "eval_max_new_tokens", "generate_batch_size", "negative_words", "retain_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")
        for name in ("retain_weight", "unlikelihood_weight", "preference_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise MechsafeError(f"{name}={value} must be a non-negative number (0 turns the term off)")
        if not (self.preference_beta > 0 and math.isfinite(self.preference_beta)):
            raise MechsafeError(f"preference_beta={self.preference_beta} must be a positive number, e.g. 0.1")
        for name in ("harmful_limit", "harmless_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise MechsafeError(f"{name}={value} must be at least 2 (one prompt per form) or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
