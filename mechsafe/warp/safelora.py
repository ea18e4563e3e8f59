"""SafeLoRA (Hsu et al., NeurIPS 2024): project a LoRA fine-tune's updates onto the alignment subspace.

For each adapted weight (linear layout ``[d_out, d_in]``), ``V = W_aligned − W_base`` spans what alignment changed.
The projector is ``C = V Vᵀ / ‖V‖_F`` (the reference code's approximation, ``projector="approx"``) or the exact
orthogonal projector onto ``V``'s column space (``"exact"``, from its SVD). The fine-tune's update ``ΔW = B A``
is replaced by ``C ΔW`` (i.e. ``B ← C B``) in every weight where the cosine between ``C ΔW`` and ``ΔW`` is below
``threshold``: there the update leaves the alignment subspace. A weight alignment did not change (``V = 0``) has
``C = 0``: its update is removed.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.weights import WeightHandle


def projector(v: torch.Tensor, kind: str = "approx") -> torch.Tensor:
    """``[d_out, d_out]`` projector of the alignment update ``v`` (``[d_out, d_in]``), in float64."""
    v = v.double()
    norm = torch.linalg.matrix_norm(v)
    if kind == "approx":
        return v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0], dtype=torch.float64)
    if kind != "exact":
        raise MechsafeError(f"unknown SafeLoRA projector {kind!r}; use approx or exact")
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    keep = s > s.max().clamp_min(1e-300) * max(v.shape) * torch.finfo(torch.float64).eps if s.numel() else s > 0
    return u[:, keep] @ u[:, keep].T


def safe_lora(model: HookedTransformer, before: Mapping[str, torch.Tensor], base: HookedTransformer,
              handles: Sequence[WeightHandle], threshold: float = 0.5, kind: str = "approx") -> list[dict[str, Any]]:
    """Project the updates ``model − before`` of ``handles`` (``model``: the aligned model after a LoRA fine-tune,
    merged; ``before``: its weights before, by parameter name; ``base``: the unaligned model it was aligned from),
    in place. Returns, per weight, the cosine and whether it was projected."""
    base_params = dict(base.named_parameters())
    out = []
    with torch.no_grad():
        for h in handles:
            if h.name not in base_params or base_params[h.name].shape != h.shape:
                raise MechsafeError(f"the base model has no weight {h.name} of shape {tuple(h.shape)}; pass the model "
                                    "the aligned one was trained from")
            w0 = h.as_matrix(before[h.name]).T.double()
            delta = h.as_matrix(h.parameter.detach()).T.double() - w0
            c = projector(w0 - h.as_matrix(base_params[h.name].detach()).T.double(), kind)
            projected = c @ delta
            denom = torch.linalg.matrix_norm(projected) * torch.linalg.matrix_norm(delta)
            cos = float((projected * delta).sum() / denom) if denom > 0 else 0.0
            project = cos < threshold
            if project:
                h.parameter.copy_(h.from_matrix((w0 + projected).T.to(h.parameter.dtype)))
            out.append({"weight": h.name, "cosine": cos, "projected": project})
    return out
