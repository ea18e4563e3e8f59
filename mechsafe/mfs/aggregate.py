"""Error-correcting aggregation of feature votes: a fixed code puts every feature in ``r`` of ``G`` groups, groups sum
their members' votes, and a robust rule over the groups gives the safety score.

Rules: ``median`` of the group scores; ``trimmed`` mean (dropping the ``trim`` share at each end); ``majority``
(the share of groups voting positive, minus one half); ``sum`` of the votes (the control without error correction,
equal to the sum of group scores divided by ``r``).

Tolerance: a removed or corrupted feature changes the scores of at most its ``r`` groups. The median moves outside
the range of the untouched groups' scores only when at least half the groups are touched, so it tolerates any
``m < G / (2r)`` removed features (worst case, adversarial choice) — and, when every group carries the same
evidence, returns exactly the same score; the trimmed mean tolerates ``m < trim·G / r``. The sum has no such
guarantee: each removed feature moves it by its vote.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from mechsafe.errors import MechsafeError

RULES = ("median", "trimmed", "majority", "sum")


def group_code(n_features: int, n_groups: int, r: int, seed: int = 0) -> Int[torch.Tensor, "n_features r"]:
    """The groups of each feature: ``r`` distinct groups per feature, every group with ``⌊N·r/G⌋`` or ``⌈N·r/G⌉``
    members, drawn by ``seed`` (a shuffled balanced assignment, repeated groups of a feature repaired by swaps)."""
    if not 1 <= r <= n_groups:
        raise MechsafeError(f"r={r} must be between 1 and the number of groups ({n_groups})")
    if n_features < 1:
        raise MechsafeError(f"n_features={n_features} must be positive")
    gen = torch.Generator().manual_seed(seed)
    slots = (torch.arange(n_features * r) % n_groups)[torch.randperm(n_features * r, generator=gen)]
    code = slots.reshape(n_features, r).clone()
    for _ in range(100):
        srt = code.sort(dim=1).values
        bad = torch.nonzero((srt[:, 1:] == srt[:, :-1]).any(dim=1)).flatten()
        if bad.numel() == 0:
            return code
        for f in bad.tolist():  # swap one repeated entry with a random entry of another feature, when both stay valid
            row = code[f].tolist()
            col = next((c for c in range(r) if row.count(row[c]) > 1), None)
            if col is None:  # an earlier swap of this pass fixed it
                continue
            for _ in range(64):
                g = int(torch.randint(n_features, (1,), generator=gen))
                c2 = int(torch.randint(r, (1,), generator=gen))
                a, b = int(code[f, col]), int(code[g, c2])
                if g != f and b not in row and a not in code[g].tolist():
                    code[f, col], code[g, c2] = b, a
                    break
    raise MechsafeError(f"could not give every feature {r} distinct groups of {n_groups}; use more groups")


def group_scores(ids: Int[torch.Tensor, "... k"], votes: Float[torch.Tensor, "... k"],
                 code: Int[torch.Tensor, "n_features r"], n_groups: int) -> Float[torch.Tensor, "... n_groups"]:
    """Each group's summed vote from the active features ``ids`` and their ``votes``."""
    groups = code[ids]  # [..., k, r]
    out = torch.zeros(*ids.shape[:-1], n_groups, dtype=votes.dtype, device=votes.device)
    src = votes[..., None].expand(groups.shape)
    return out.scatter_add_(-1, groups.flatten(-2), src.flatten(-2))


def aggregate(scores: Float[torch.Tensor, "... n_groups"], rule: str = "median", r: int = 1,
              trim: float = 0.1) -> Float[torch.Tensor, "..."]:
    """The safety score from the group scores by ``rule`` (``r``: groups per feature, for ``sum``)."""
    if rule == "median":
        return scores.median(dim=-1).values
    if rule == "trimmed":
        if not 0 <= trim < 0.5:
            raise MechsafeError(f"trim={trim} must be in [0, 0.5)")
        g = scores.shape[-1]
        cut = int(trim * g)
        return scores.sort(dim=-1).values[..., cut:g - cut].mean(dim=-1)
    if rule == "majority":
        return (scores > 0).float().mean(dim=-1) - 0.5
    if rule == "sum":
        return scores.sum(dim=-1) / r
    raise MechsafeError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}")


def tolerance(n_groups: int, r: int, rule: str = "median", trim: float = 0.1) -> int:
    """The most features an adversary may remove with the rule's output guaranteed to stay within the untouched
    groups' range (0 for ``sum``)."""
    if rule in ("median", "majority"):
        return max(0, (n_groups - 1) // 2 // r)
    if rule == "trimmed":
        return max(0, int(trim * n_groups) // r)
    if rule == "sum":
        return 0
    raise MechsafeError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}")
