"""The preference term: DPO (Rafailov et al., 2023) on (chosen, rejected) responses to one prompt.

The :class:`~mechsafe.finetune.objectives.Preference` objective adds to the loss, for every example ``i``
of the objective with its rejected response (the chosen response is the example's own), averaged over
those examples of the step::

    margin_i = [log p(chosen_i) - log p_ref(chosen_i)] - [log p(rejected_i) - log p_ref(rejected_i)]
    loss_i   = -log sigmoid(beta * margin_i)

where ``log p`` is the summed log-probability of the response tokens after the prompt and
``p_ref`` the model before training (computed once, before the first step). Every margin starts
at 0, so the term starts at ``log 2``.
Unlike the response NLL, the term saturates: it stops pushing once the model prefers the chosen
response by a margin of a few ``1 / beta``, and it raises the chosen response only *relative* to
the rejected one. ``align`` uses it with refusals preferred to the base model's own answers on
harmful prompts and the base model's answers preferred to a refusal opening on harmless ones.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe.forward import TeacherForced, sequence_nll


@dataclasses.dataclass
class Pair:
    """The rejected response of one example and the reference model's NLL of both responses."""

    rejected: TeacherForced
    """The example's prompt followed by the rejected response."""
    ref_chosen_nll: float
    """Summed NLL of the example's own response under the model before training."""
    ref_rejected_nll: float
    """Summed NLL of the rejected response under the model before training."""


def reference_pairs(model: HookedTransformer, seqs: Sequence[TeacherForced], rejected: Mapping[int, TeacherForced],
                    chosen_nll: Mapping[int, float] | None = None, rejected_nll: Mapping[int, float] | None = None,
                    batch_size: int = 16, share_prompts: bool = False) -> dict[int, Pair]:
    """:class:`Pair` of every example index in ``rejected`` (``model`` is the reference: call before training).
    ``chosen_nll`` and ``rejected_nll`` hold reference NLLs of examples' own and rejected responses already
    computed (the retain term's pass computes both); only the others are computed here, with each prompt run
    once for both of an example's responses when ``share_prompts``."""
    known, known_rej = dict(chosen_nll or {}), dict(rejected_nll or {})
    idx = list(rejected)
    todo = [i for i in idx if i not in known]
    todo_rej = [i for i in idx if i not in known_rej]
    if todo or todo_rej:
        nll, _ = sequence_nll(model, [seqs[i] for i in todo] + [rejected[i] for i in todo_rej], batch_size, share_prompts)
        known.update(zip(todo, nll[:len(todo)].tolist()))
        known_rej.update(zip(todo_rej, nll[len(todo):].tolist()))
    return {i: Pair(rejected=rejected[i], ref_chosen_nll=known[i], ref_rejected_nll=known_rej[i]) for i in idx}


def dpo_loss(chosen_nll: Float[torch.Tensor, " n"], rejected_nll: Float[torch.Tensor, " n"],
             pairs: Sequence[Pair], beta: float) -> Float[torch.Tensor, " n"]:
    """``-log sigmoid(beta * margin)`` of each pair, from the current model's summed NLLs of its responses."""
    ref_chosen = torch.tensor([p.ref_chosen_nll for p in pairs], device=chosen_nll.device, dtype=chosen_nll.dtype)
    ref_rejected = torch.tensor([p.ref_rejected_nll for p in pairs], device=chosen_nll.device, dtype=chosen_nll.dtype)
    margin = (ref_chosen - chosen_nll) - (ref_rejected - rejected_nll)
    return torch.nn.functional.softplus(-beta * margin)
