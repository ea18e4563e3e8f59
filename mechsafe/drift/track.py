"""How far every MLP neuron and attention head has moved from its initial weights, during fine-tuning.

A unit's weight vector is the concatenation of its slices:

* an MLP **neuron**: its ``W_in`` and ``W_gate`` columns and its ``W_out`` row;
* an attention **head**: its ``W_Q`` and ``W_O`` slices and its key/value head's ``W_K``/``W_V`` slices (under
  grouped-query attention the query heads of a group share those, so they count in each of them).

For each unit :func:`unit_terms` gives three sums over its slices, from which every drift metric follows
(:func:`drift_metrics`): ``‖w0‖²``, ``⟨w0, Δ⟩`` and ``‖Δ‖²`` with ``Δ = w - w0`` of the *effective* weights. Under
LoRA a weight's update is ``Δ = L @ R`` (``L = scale * A.T``, ``R = B.T``, rank ``r``), so per output column ``c``
``‖Δ[:, c]‖² = R[:, c]ᵀ (LᵀL) R[:, c]`` and ``⟨w0[:, c], Δ[:, c]⟩ = (Lᵀ w0)[:, c] · R[:, c]`` (and the same with the
roles swapped for units along the input): ``O(r · size)`` work and no merged matrix. Weights that train directly
(``full``) are compared with a copy of their initial values.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformer_lens import HookedTransformer

from mechsafe.finetune.lora import ADAPTER, lora_layer_cls
from mechsafe.weights import WeightHandle, has_kind, select

UNIT_KINDS = {"neuron": ("mlp.W_in", "mlp.W_gate", "mlp.W_out"),
              "head": ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O")}
"""The weight kinds whose slices make up each unit type."""
_ALONG_INPUT = ("mlp.W_out", "attn.W_O")
"""Kinds whose units are rows of :meth:`WeightHandle.as_matrix` (slices of the input); the others' are columns."""
METRICS = ("cosine", "l2", "relative")
"""Cosine similarity to the initial weights, L2 distance ``‖Δ‖`` and relative change ``‖Δ‖ / ‖w0‖``."""


def handles(model: HookedTransformer) -> dict[str, list[WeightHandle]]:
    """The block weights of each unit type that ``model`` has."""
    return {unit: select(model, [k for k in kinds if has_kind(model, k)], "all") for unit, kinds in UNIT_KINDS.items()}


def _factors(model: HookedTransformer, h: WeightHandle) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, R)`` with the weight's LoRA update ``as_matrix(Δ) = L @ R``, or ``None`` without an active adapter."""
    module = getattr(model.blocks[h.layer], h.kind.split(".")[0])
    if not isinstance(module, lora_layer_cls()) or h.attr not in module.weights or ADAPTER not in module.lora_A \
            or module.merged:
        return None
    a, b = module.lora_A[ADAPTER][h.attr].detach(), module.lora_B[ADAPTER][h.attr].detach()
    return a.T * module.scaling[ADAPTER], b.T


def _query_heads(h: WeightHandle, values: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per-key/value-head values repeated for the query heads that share each (identity for other weights)."""
    return values if h.n_units == n_heads else values.repeat_interleave(n_heads // h.n_units, dim=0)


def initial_state(model: HookedTransformer, copy: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What :func:`unit_terms` compares with: per unit weight, its initial matrix (:meth:`WeightHandle.as_matrix`;
    a copy when ``copy``, as weights that train directly need, while under LoRA the frozen base weights serve as
    they are) and the squared norms of its unit slices' columns (float64)."""
    out = {}
    for hs in handles(model).values():
        for h in hs:
            m0 = h.as_matrix(h.parameter.detach())
            m0 = m0.clone() if copy else m0
            out[h.name] = (m0, ((m0.T if h.kind in _ALONG_INPUT else m0).double() ** 2).sum(0))
    return out


@torch.no_grad()
def unit_terms(model: HookedTransformer, initial: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
    """``{"neuron": [n_layers, d_mlp, 3], "head": [n_layers, n_heads, 3]}`` (float64): per unit
    ``(‖w0‖², ⟨w0, Δ⟩, ‖Δ‖²)`` of the effective weights (base plus LoRA update) against ``initial``
    (:func:`initial_state`). A weight without an adapter whose initial matrix is the parameter itself (a frozen base
    weight under LoRA) has not moved and costs nothing."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out: dict[str, torch.Tensor] = {}
    for unit, hs in handles(model).items():
        width = model.cfg.d_mlp if unit == "neuron" else n_heads
        terms = torch.zeros(n_layers, width, 3, dtype=torch.float64)
        for h in hs:
            m0, sq0 = initial[h.name]
            factors = _factors(model, h)
            rows = h.kind in _ALONG_INPUT
            m0t = m0.T if rows else m0  # units along columns from here on
            if factors is not None:
                left, right = (factors[1].T, factors[0].T) if rows else factors
                dot = ((left.T @ m0t) * right).sum(0).double()
                sq = (((left.T @ left) @ right) * right).sum(0).double()
            elif m0.data_ptr() == h.parameter.data_ptr():
                dot = sq = torch.zeros_like(sq0)
            else:
                delta = h.as_matrix(h.parameter.detach()) - m0
                delta = delta.T if rows else delta
                dot = (m0t * delta).double().sum(0)
                sq = (delta.double() ** 2).sum(0)
            per = torch.stack([sq0, dot, sq], 1).reshape(h.n_units, -1, 3).sum(1)
            terms[h.layer] += _query_heads(h, per, n_heads) if unit == "head" else per
        out[unit] = terms
    return out


def drift_metrics(terms: torch.Tensor) -> dict[str, torch.Tensor]:
    """:data:`METRICS` from ``(‖w0‖², ⟨w0, Δ⟩, ‖Δ‖²)`` terms ``[..., 3]``: the cosine uses
    ``1 - cos = (‖w0‖²‖Δ‖² - ⟨w0, Δ⟩²) / (n (n + ‖w0‖² + ⟨w0, Δ⟩))``, ``n = ‖w0‖ ‖w0 + Δ‖``, which keeps its
    precision when the change is small."""
    a, d, q = terms.double().unbind(-1)
    n = torch.sqrt(a * (a + 2 * d + q).clamp_min(0))
    gram = (a * q - d ** 2).clamp_min(0)
    stable = gram / (n * (n + a + d)).clamp_min(1e-300)  # for cos >= 0; the plain form otherwise
    one_minus_cos = torch.where(n > 0, torch.where(a + d >= 0, stable, 1 - (a + d) / n.clamp_min(1e-300)),
                                torch.zeros_like(a))
    return {"cosine": 1 - one_minus_cos, "l2": q.clamp_min(0).sqrt(),
            "relative": torch.where(a > 0, (q / a.clamp_min(1e-300)).clamp_min(0).sqrt(), torch.zeros_like(a))}
