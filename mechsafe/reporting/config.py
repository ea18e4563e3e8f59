"""``ReportConfig``: what ``mechsafe report`` measures, on which prompts, at which sizes (``quick`` or ``full``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from mechsafe.errors import MechsafeError

SECTIONS = ("harm", "refusal", "weights", "attacks", "utility")
"""The report's sections: where harm is represented (probes), what carries refusal (the refusal direction), which
weights are safety-critical (SNIP pruning), how brittle safety is (the attack bench), and utility."""
PROFILES = ("quick", "full")

_PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "quick": {"limit": 24, "max_new_tokens": 24, "probe_layers": 6, "probe_cs": (0.01, 0.1, 1.0), "n_boot": 200,
              "selection": {"layer_step": 4, "positions": 1, "n_val": 16},
              "prune_q": (0.01, 0.03), "score_samples": 32, "attacks": ("direction", "prefill"),
              "utility_limit": 12},
    "full": {"limit": None, "max_new_tokens": 48, "probe_layers": 0, "probe_cs": (0.001, 0.01, 0.1, 1.0, 10.0),
             "n_boot": 1000, "selection": {}, "prune_q": (0.005, 0.01, 0.02, 0.05), "score_samples": 128,
             "attacks": ("harmful-lora", "benign-lora", "direction", "pruning", "prefill"), "utility_limit": None},
}


@dataclasses.dataclass
class ReportConfig:
    """Settings of :func:`mechsafe.reporting.report`. Fields left ``None`` take the profile's value (see
    :data:`_PROFILE_DEFAULTS` through :meth:`resolved`)."""

    profile: str = "full"
    """``quick`` (smaller prompt sets and sweeps) or ``full``."""
    sections: tuple[str, ...] = SECTIONS
    """Sections to compute (see :data:`SECTIONS`)."""
    harmful: str = "harmful"
    """Held-out harmful prompts: a bundled pool (its TEST split) or a local file with a text column."""
    harmless: str = "harmless"
    """Held-out harmless prompts, the same way."""
    probe_data: str = "harmful_vs_harmless"
    """Labelled prompts of the probe section: a bundled suite or a local file with text and label columns."""
    limit: int | None = None
    """Use the first N held-out prompts of each set (profile: quick 24, full all)."""
    max_new_tokens: int | None = None
    """Greedy tokens judged per response (profile: quick 24, full 48)."""
    probe_layers: int | None = None
    """Probe every layer (0) or this many evenly spaced layers (profile: quick 6, full 0)."""
    probe_cs: tuple[float, ...] | None = None
    """Inverse regularization strengths searched by the dense probes."""
    n_boot: int | None = None
    """Bootstrap resamples of the probe intervals."""
    selection: dict[str, Any] | None = None
    """Overrides of the refusal-direction selection (:class:`mechsafe.directions.SelectionConfig` fields)."""
    prune_q: tuple[float, ...] | None = None
    """Set-difference ``p = q`` values of the pruning section (each with a matched random point)."""
    score_samples: int | None = None
    """SNIP examples per scoring data set."""
    attacks: tuple[str, ...] | None = None
    """Attacks of the attack bench (profile: quick direction and prefill; full adds harmful and benign LoRA
    fine-tuning and SNIP pruning)."""
    attack_base: str = "smollm2-135m-instruct"
    """Unaligned model whose answers to harmful requests the harmful fine-tuning attack trains on."""
    utility_limit: int | None = None
    """Use the first N held-out arithmetic problems and reference answers."""
    seed: int = 0
    """Seed of every sampled choice and interval."""

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise MechsafeError(f"unknown report profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        self.sections = tuple(self.sections)
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise MechsafeError(f"unknown report section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        for name in ("limit", "max_new_tokens", "n_boot", "score_samples", "utility_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MechsafeError(f"{name}={value!r} must be a positive integer (or leave it to the profile)")
        if self.probe_layers is not None and self.probe_layers < 0:
            raise MechsafeError(f"probe_layers={self.probe_layers} must be 0 (every layer) or a positive count")
        for name in ("probe_cs", "prune_q", "attacks"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))

    def resolved(self) -> "ReportConfig":
        """A copy with every ``None`` field set from the profile."""
        values = dataclasses.asdict(self)
        for key, value in _PROFILE_DEFAULTS[self.profile].items():
            if values[key] is None:
                values[key] = value
        return ReportConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
