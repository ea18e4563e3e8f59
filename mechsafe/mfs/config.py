"""Settings of the safety feature bank (:class:`BankConfig`) and of its training (:class:`TrainConfig`)."""

from __future__ import annotations

import dataclasses
import math

from mechsafe.errors import MechsafeError
from mechsafe.hooks import parse_layers
from mechsafe.mfs.aggregate import RULES


@dataclasses.dataclass
class BankConfig:
    """The bank's features: which types read which layers, how many, and how their votes are aggregated."""

    types: tuple[str, ...] = ("semantic", "activation", "ngram", "attention")
    """Feature types (``semantic``, ``activation``, ``ngram``, ``attention``, or a registered one)."""
    layers: str = "15"
    """Layers the layered types read (one sub-bank per type and layer): ``15``, ``10,20``, ``middle`` ..."""
    n_features: int = 1_000_000
    """Features in all; split equally over the sub-banks, each share a perfect square (product keys)."""
    d_key: int = 64
    """Width of each product-key half."""
    k: int = 32
    """Features retrieved per token and sub-bank (the top ``k``; those with a positive score fire)."""
    n_groups: int = 256
    """Groups of the error-correcting code."""
    r: int = 3
    """Groups each feature belongs to."""
    rule: str = "median"
    """Aggregation over groups: ``median``, ``trimmed``, ``majority`` or ``sum`` (the control)."""
    window: int = 3
    """Tokens an ``ngram`` feature reads."""
    seed: int = 0
    """Seed of the keys and of the code."""

    def __post_init__(self) -> None:
        self.types = tuple(self.types)
        if not self.types:
            raise MechsafeError("no feature type given; choose from semantic, activation, ngram, attention")
        if self.rule not in RULES:
            raise MechsafeError(f"unknown aggregation rule {self.rule!r}; choose one of {', '.join(RULES)}")
        for name in ("n_features", "d_key", "k", "n_groups", "r", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")
        if self.r > self.n_groups:
            raise MechsafeError(f"r={self.r} must be at most n_groups={self.n_groups}")
        if not isinstance(self.layers, str):
            self.layers = ",".join(str(i) for i in self.layers) if not isinstance(self.layers, int) else str(self.layers)
        parse_layers(self.layers, 10_000)

    def per_bank(self, n_banks: int) -> int:
        """Features of each of ``n_banks`` sub-banks; raises naming the nearest valid totals."""
        share, rest = divmod(self.n_features, n_banks)
        side = math.isqrt(share)
        if rest or side * side != share:
            low, high = n_banks * side * side, n_banks * (side + 1) ** 2
            raise MechsafeError(f"n_features={self.n_features} does not split into {n_banks} sub-banks of a perfect "
                                f"square each (product keys need n²); use {low} or {high}")
        return share


@dataclasses.dataclass
class TrainConfig:
    """Training of the bank's keys and votes (``mechsafe mfs train``)."""

    data: str = "harmful_vs_harmless"
    """Labelled prompts: a bundled suite (its train split) or a local file with text and label columns."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Prompts per step (drawn balanced from the two classes)."""
    lr: float = 1e-2
    """Adam learning rate."""
    margin: float = 1.0
    """Hinge margin of the safety term: harmful scores above +margin, harmless below -margin."""
    feature_dropout: float = 0.3
    """Share of features removed at random in each step (robustness)."""
    group_dropout: float = 0.3
    """Share of groups dropped at random in each step (robustness)."""
    train_trim: float = 0.25
    """Training aggregates by the trimmed mean with this trim at each end (the median passes gradient to one
    group only); evaluation uses the bank's rule."""
    sparsity: float = 0.01
    """Base weight of the sparsity term (mean firing strength)."""
    diversity: float = 0.1
    """Base weight of the diversity term (squared correlation between sub-banks' scores over the batch)."""
    adaptive: bool = True
    """Scale each auxiliary term by the running ratio of the safety term to it (each then weighs like the safety
    term times its base weight); False keeps the base weights."""
    checkpoint_every: int = 50
    """Save the bank and optimizer every this many steps (a killed run resumes there)."""
    seed: int = 0
    """Seed of the batches and dropouts."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")
        for name in ("feature_dropout", "group_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.train_trim < 0.5:
            raise MechsafeError(f"train_trim={self.train_trim} must be in [0, 0.5)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise MechsafeError(f"lr={self.lr} must be a positive number")
        if self.sparsity < 0 or self.diversity < 0 or self.margin < 0:
            raise MechsafeError("sparsity, diversity and margin must be >= 0")
