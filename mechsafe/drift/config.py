"""Settings of the drift study (``mechsafe drift``)."""

from __future__ import annotations

import dataclasses

from mechsafe.errors import MechsafeError

CONDITIONS = ("benign", "harmful")
"""The fine-tunes whose drift is tracked: utility pairs, and the attack bench's harmful pairs."""
FREEZE_GROUPS = ("top-safety", "set-difference", "random")
"""Neuron groups frozen in the freezing experiment (``random``: matched in size per block)."""


@dataclasses.dataclass
class DriftConfig:
    """The drift runs, the freezing experiment and the evaluation along them."""

    method: str = "lora"
    """How the drift runs train: ``lora`` (the trainer's default targets) or ``full`` (every weight)."""
    lr: float = 1e-3
    """Learning rate of both drift fine-tunes (benign and harmful use the same)."""
    steps: int = 40
    """Optimizer steps of each drift run."""
    every: int = 10
    """Record drift, refusal and utility every this many steps (and at step 0)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of each drift fine-tune (example draw, order and LoRA initialization)."""
    n_examples: int = 32
    """Training pairs of each run, drawn per seed."""
    batch_size: int = 4
    """Pairs per optimizer step."""
    answer_tokens: int = 64
    """Most tokens of the base model's answers in the harmful pairs (the attack bench's data)."""
    eval_limit: int = 16
    """Held-out harmful and harmless prompts of the refusal score recorded along the runs."""
    freeze_fractions: tuple[float, ...] = (0.005, 0.01, 0.03, 0.075)
    """Shares of each block's MLP neurons frozen in the freezing experiment (empty: no freezing experiment)."""
    freeze_lr: float = 1e-4
    """Learning rate of the freezing runs (full-parameter: a frozen neuron stays bit-identical)."""
    freeze_steps: int = 20
    """Optimizer steps of each freezing run (harmful pairs, seed of ``seeds[0]``)."""
    freeze_every: int = 5
    """Evaluate a freezing run every this many steps."""
    utility_p: float = 0.03
    """Set-difference groups leave out each block's top ``utility_p`` share of neurons by utility score."""
    group_fraction: float = 0.03
    """Size of the drift study's top-safety, top-utility and set-difference groups (per block and unit type)."""
    responses: str = "own"
    """Responses of the SNIP scoring data the groups come from (``own``: the model's; ``bundled``)."""
    seed: int = 0
    """Seed of the random groups, the evaluation subsets and the bootstrap intervals."""

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise MechsafeError(f"unknown method {self.method!r}; use lora or full")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.freeze_fractions = tuple(float(f) for f in self.freeze_fractions)
        for name in ("steps", "every", "n_examples", "batch_size", "answer_tokens", "eval_limit", "freeze_steps",
                     "freeze_every"):
            if int(getattr(self, name)) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.every > self.steps:
            raise MechsafeError(f"every={self.every} is more than steps={self.steps}: nothing would be recorded after "
                                "step 0; lower --every or raise --steps")
        if self.freeze_every > self.freeze_steps:
            raise MechsafeError(f"freeze_every={self.freeze_every} is more than freeze_steps={self.freeze_steps}; "
                                "lower --freeze-every or raise --freeze-steps")
        if not self.seeds:
            raise MechsafeError("give at least one seed")
        for f in self.freeze_fractions:
            if not 0 < f < 1:
                raise MechsafeError(f"freeze fraction {f} must be in (0, 1): freezing every neuron leaves nothing to "
                                    "attack with; use shares such as 0.01")
        for name in ("utility_p", "group_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be in (0, 1)")
        if self.responses not in ("own", "bundled"):
            raise MechsafeError(f"unknown response source {self.responses!r}; use own or bundled")
        if not (self.lr > 0 and self.freeze_lr > 0):
            raise MechsafeError("learning rates must be positive")
