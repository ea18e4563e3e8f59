"""ActSVD low-rank attribution (Wei et al., ICML 2024): the output directions a weight uses most on some data.

For a weight ``W`` (as a ``d_out x d_in`` matrix, the transpose of its TransformerLens ``as_matrix`` form) and its
inputs ``X`` on the response tokens of (prompt, response) pairs (``tokens x d_in``), the top-``r`` right singular
vectors ``V`` of the output ``X Wᵀ`` (``tokens x d_out``) span the directions the weight writes most on that data.
They are the top eigenvectors of the output Gram matrix ``(X Wᵀ)ᵀ (X Wᵀ) = W (XᵀX) Wᵀ``, which is what is
accumulated: one ``d_in x d_in`` input Gram per input hook (shared by the weights reading it, e.g. ``W_Q``,
``W_K``, ``W_V``), so no activation is kept. Removing ranks (:func:`mechsafe.interventions.remove_ranks`):
``W ← W − Π W`` with ``Π = V Vᵀ``, or ``W ← W − (I − Π_u) Π_s W`` to spare the utility directions ``V_u``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe.chat import pad_id
from mechsafe.forward import TeacherForced, collate, eval_mode
from mechsafe.snip.scores import batches
from mechsafe.weights import WeightHandle


@torch.no_grad()
def input_grams(model: HookedTransformer, seqs: Sequence[TeacherForced], handles: Sequence[WeightHandle],
                batch_size: int = 8, positions: str = "response") -> dict[str, Float[torch.Tensor, "d_in d_in"]]:
    """``XᵀX`` (float64) of each handle's input hook, before any norm weight (:func:`weight_gram` applies it), over
    the response tokens' positions (``positions="response"``, as the ActSVD reference code records them: where the
    token itself belongs to the response) or over every token of each sequence, padding excluded (``"all"``)."""
    if positions not in ("response", "all"):
        raise ValueError(f"positions={positions!r}; use response or all")
    hooks = sorted({h.input_hook for h in handles})
    grams: dict[str, torch.Tensor] = {}
    pad = pad_id(model.tokenizer)
    current: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, hook) -> None:
        if hook.name in current["seen"]:  # TransformerLens normalizes a block's input once each for Q, K and V
            return
        current["seen"].add(hook.name)
        sel = current["mask"].to(x.device)
        rows = x.reshape(*x.shape[:2], -1)[sel].double()
        g = grams.get(hook.name)
        grams[hook.name] = rows.T @ rows if g is None else g.add_(rows.T @ rows)

    with eval_mode(model):
        for batch in batches(seqs, batch_size):
            tokens, mask = collate(batch, pad)
            current["seen"] = set()
            if positions == "all":
                lengths = torch.tensor([len(s) for s in batch])
                current["mask"] = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
            else:
                current["mask"] = torch.cat([torch.zeros(mask.shape[0], 1), mask], dim=1).bool()
            model.run_with_hooks(tokens.to(model.cfg.device), return_type=None,
                                 fwd_hooks=[(name, record) for name in hooks])
    return grams


def weight_gram(model: HookedTransformer, handle: WeightHandle, grams: dict[str, torch.Tensor]
                ) -> Float[torch.Tensor, "d_in d_in"]:
    """The Gram ``XᵀX`` of the weight's own input from its hook's Gram (scaled by the norm weight the hook's value
    is multiplied by before it reaches the weight, when there is one)."""
    g = grams[handle.input_hook]
    if handle.input_norm_weight is None:
        return g
    w = model.get_parameter(handle.input_norm_weight).detach().double().cpu()
    return g * w[:, None] * w[None, :]


def output_directions(model: HookedTransformer, grams: dict[str, torch.Tensor], handles: Sequence[WeightHandle],
                      rank: int) -> dict[str, Float[torch.Tensor, "d_out rank"]]:
    """The top-``rank`` right singular vectors of each weight's output ``X Wᵀ`` (columns, by decreasing singular
    value), from the input Grams of :func:`input_grams`."""
    out = {}
    for h in handles:
        g = weight_gram(model, h, grams)
        m = h.as_matrix(h.parameter.detach()).double().cpu()  # [d_in, d_out]
        vals, vecs = torch.linalg.eigh(m.T @ g @ m)
        out[h.name] = vecs[:, torch.argsort(vals, descending=True)[:rank]].float()
    return out
