"""Product-key retrieval (Lample et al., NeurIPS 2019): the exact top-k of ``N = n²`` feature scores at
``O((n + k²)·d)`` cost instead of ``O(N·d)``.

Feature ``(i, j)`` (id ``i·n + j``) has the score ``q₁·K₁[i] + q₂·K₂[j]``, where ``q = [q₁; q₂]`` is a learned
projection of the input split in two halves and ``K₁``, ``K₂`` are ``n`` sub-keys each. Because the score is a sum
of one term per half, a feature in the top-k of all ``N`` has its ``i`` among the top-k of the first half's ``n``
scores and its ``j`` among the top-k of the second's (otherwise ``k`` features would beat it), so scoring the
``k²`` combinations of the two top-k lists gives the exact top-k.

Example::

    keys = ProductKeys(n_features=1_000_000, d_in=576, d_key=64, k=32)
    ids, scores = keys(x)          # x [..., 576] -> [..., 32] feature ids and their scores
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import nn

from mechsafe.errors import MechsafeError


def side(n_features: int) -> int:
    """``n`` with ``n² = n_features``; raises naming the nearest valid sizes when it is not a perfect square."""
    if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1:
        raise MechsafeError(f"n_features={n_features!r} must be a positive integer")
    n = math.isqrt(n_features)
    if n * n != n_features:
        raise MechsafeError(f"n_features={n_features} is not a perfect square; product keys need N = n², e.g. "
                            f"{n * n} or {(n + 1) ** 2}")
    return n


class ProductKeys(nn.Module):
    """A query projection and two sets of ``√N`` sub-keys; ``forward`` returns the top-``k`` features per input."""

    def __init__(self, n_features: int, d_in: int, d_key: int = 64, k: int = 32, seed: int = 0):
        super().__init__()
        self.n = side(n_features)
        if not 1 <= k <= self.n:
            raise MechsafeError(f"k={k} must be between 1 and sqrt(n_features)={self.n}")
        self.n_features, self.d_key, self.k = n_features, d_key, k
        gen = torch.Generator().manual_seed(seed)
        self.query = nn.Parameter(torch.randn(d_in, 2 * d_key, generator=gen) / math.sqrt(d_in))
        self.keys1 = nn.Parameter(torch.randn(self.n, d_key, generator=gen) / math.sqrt(d_key))
        self.keys2 = nn.Parameter(torch.randn(self.n, d_key, generator=gen) / math.sqrt(d_key))

    def half_scores(self, x: Float[torch.Tensor, "... d_in"]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves' sub-key scores ``[..., n]`` each."""
        q1, q2 = (x @ self.query).split(self.d_key, dim=-1)
        return q1 @ self.keys1.T, q2 @ self.keys2.T

    def full_scores(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... n_features"]:
        """Every feature's score (``O(N)`` memory per input: for checks and small banks)."""
        s1, s2 = self.half_scores(x)
        return (s1[..., :, None] + s2[..., None, :]).flatten(-2)

    def forward(self, x: Float[torch.Tensor, "... d_in"]
                ) -> tuple[Int[torch.Tensor, "... k"], Float[torch.Tensor, "... k"]]:
        s1, s2 = self.half_scores(x)
        v1, i1 = s1.topk(self.k, dim=-1)
        v2, i2 = s2.topk(self.k, dim=-1)
        scores, flat = (v1[..., :, None] + v2[..., None, :]).flatten(-2).topk(self.k, dim=-1)
        ids = i1.gather(-1, flat // self.k) * self.n + i2.gather(-1, flat % self.k)
        return ids, scores
