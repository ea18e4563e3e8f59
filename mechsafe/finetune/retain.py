"""The retain term: KL from the model before training, on chosen examples.

The :class:`~mechsafe.finetune.objectives.RetainKL` objective penalizes how far the trained model's
next-token distributions move from the model it started from, on its examples (``align`` passes its
harmless examples), at every position of those sequences (prompt and response)::

    term = weight * sum_{retained (b, t)} KL(p_ref[b, t] || p[b, t]) / #retained positions

The reference distributions are computed once, before the first step, and kept as
their ``top_k`` most probable tokens plus one bucket for all other tokens. The KL between two
distributions coarsened to those ``k + 1`` outcomes is what is optimized: it is a lower bound
on the full KL (coarsening never increases a divergence) and equals it when ``k`` covers the
vocabulary. The term starts at 0: exactly with one pass per row, within float rounding (~1e-9) when
the reference and training passes batch rows differently, as with shared prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.forward import TeacherForced, eval_mode, final_resid, masked_nll, shared_prompt_resid, unembed

_EPS = 1e-7


@dataclasses.dataclass
class Reference:
    """The reference next-token distribution at each predicting position of one sequence."""

    logp: Float[torch.Tensor, "pos k"]
    """Log-probabilities of the ``k`` most probable tokens (positions ``0 .. len - 2``)."""
    idx: Int[torch.Tensor, "pos k"]
    """Their token ids."""
    response_nll: float
    """Summed NLL of the sequence's response tokens under the reference model (the preference term reuses
    it instead of a second forward pass over the same sequence)."""
    alternative_nll: float | None = None
    """Summed NLL of the response passed as this sequence's alternative to :func:`reference_topk` (its rejected
    response), or ``None``."""


@torch.no_grad()
def reference_topk(model: HookedTransformer, seqs: Sequence[TeacherForced], k: int, batch_size: int = 16,
                   alternatives: Sequence[TeacherForced | None] | None = None) -> list[Reference]:
    """Top-``k`` next-token distributions of ``model`` at every predicting position of each sequence (and
    its response NLL). Sequences are batched longest first, so rows of similar length share a batch.

    ``alternatives[j]``, when given and not ``None``, is another response after the prompt of ``seqs[j]`` (its
    rejected response): it runs in the same pass from the prompt's cached keys and values
    (:func:`~mechsafe.forward.shared_prompt_resid`, as does the whole pass then), and its response
    NLL is kept as ``alternative_nll``."""
    k = min(k, model.cfg.d_vocab)
    pad = chat.pad_id(model.tokenizer)
    out: list[Reference | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            alt = [i for i in idx if alternatives is not None and alternatives[i] is not None]
            rows = [seqs[i] for i in idx]
            if alternatives is not None:
                tokens, mask, resid = shared_prompt_resid(model, rows + [alternatives[i] for i in alt], pad)
                alt_nll = masked_nll(model, tokens[len(idx):], mask[len(idx):], resid=resid[len(idx):]).tolist()
                tokens, resid = tokens[:len(idx)], resid[:len(idx)]
            else:
                tokens, _ = chat.pad_right([s.ids for s in rows], pad)
                resid, alt_nll = final_resid(model, tokens), []
            n_pos = torch.tensor([len(s) - 1 for s in rows])
            sel = torch.arange(resid.shape[1])[None, :] < n_pos[:, None]
            logp = torch.log_softmax(unembed(model, resid[sel.to(resid.device)]).float(), dim=-1)
            top = logp.topk(k, dim=-1)
            sizes = n_pos.tolist()
            other = dict(zip(alt, alt_nll))
            for i, lp, v, j in zip(idx, logp.split(sizes), top.values.split(sizes), top.indices.split(sizes)):
                seq = seqs[i]  # position t predicts token t + 1; the response starts at prompt_len
                targets = torch.tensor(seq.ids[seq.prompt_len:], device=lp.device)
                nll = -lp[seq.prompt_len - 1:].gather(1, targets[:, None]).sum()
                out[i] = Reference(logp=v.cpu(), idx=j.cpu(), response_nll=float(nll), alternative_nll=other.get(i))
    return out


def coarse_kl(logits: Float[torch.Tensor, "n d_vocab"], ref_logp: Float[torch.Tensor, "n k"],
              ref_idx: Int[torch.Tensor, "n k"]) -> Float[torch.Tensor, " n"]:
    """``KL(ref || softmax(logits))`` over the outcomes {each of the reference's top-k tokens, any other token}."""
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, ref_idx.to(logits.device))
    ref_logp = ref_logp.to(logits.device)
    p = ref_logp.exp()
    p_top = p.sum(-1).clamp(max=1 - _EPS)  # mass of the top-k tokens; the "any other token" bucket has the rest
    q_top = logq.exp().sum(-1).clamp(max=1 - _EPS)
    return (p * (ref_logp - logq)).sum(-1) + (1 - p_top) * (torch.log1p(-p_top) - torch.log1p(-q_top))


def retain_kl_sum(model: HookedTransformer, resid: Float[torch.Tensor, "batch pos_minus_1 d_model"],
                  rows: Sequence[int], refs: Sequence[Reference]) -> torch.Tensor:
    """Summed :func:`coarse_kl` over every predicting position of batch rows ``rows`` (ascending;
    ``refs[j]`` belongs to row ``rows[j]``); differentiable."""
    sel = torch.zeros(resid.shape[:2], dtype=torch.bool, device=resid.device)
    for row, ref in zip(rows, refs):
        sel[row, :ref.logp.shape[0]] = True
    ref_logp = torch.cat([r.logp for r in refs])
    ref_idx = torch.cat([r.idx for r in refs])
    return coarse_kl(unembed(model, resid[sel]), ref_logp, ref_idx).sum()
