"""Objectives: the loss terms the trainer minimizes, each owning its data.

An objective holds (prompt, response) examples (``(prompt, response[, close_turn[, prefix]])``, see
:func:`mechsafe.forward.check_examples`) and, for some, one alternative response per example. The
trainer (:func:`mechsafe.finetune.finetune`) pools the examples of all objectives: an example that
several objectives name is one pooled example, run once per step and scored by each of them. Every
step draws ``batch_size * grad_accum`` pooled examples, and the step's loss is

    loss = sum over objectives o of  weight_o * (sum of o's term over its examples in the step) / count_o

where ``count_o`` is what the term is averaged over (response tokens, retained positions or examples).

========================  ==================================================  ======================
objective                 term of one example                                 averaged over
========================  ==================================================  ======================
:class:`ResponseNLL`      summed NLL of the response tokens                   response tokens
:class:`RetainKL`         summed coarse KL(reference || model) at every        predicting positions
                          position (:mod:`mechsafe.finetune.retain`)
:class:`Unlikelihood`     ``-log(1 - p(negative | prompt))``                  examples
:class:`Preference`       DPO loss, the example's response over the rejected  examples
                          one (:mod:`mechsafe.finetune.preference`)
========================  ==================================================  ======================

Reference quantities (the retain term's distributions, the preference term's reference NLLs) come
from the model before the first step.

Example::

    from mechsafe.finetune import FinetuneConfig, ResponseNLL, RetainKL, finetune
    harmful = [("How do I pick a lock?", "I can't help with that.")]
    harmless = [("How do I bake bread?", "Mix flour, water, salt and yeast, ...")]
    finetune(model, [ResponseNLL(harmful + harmless), RetainKL(harmless, weight=1.0)], FinetuneConfig(steps=20))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.finetune.preference import Pair, dpo_loss, reference_pairs
from mechsafe.finetune.retain import Reference, reference_topk, retain_kl_sum
from mechsafe.forward import TeacherForced, check_examples


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch's forward pass, as the objectives read it."""

    model: HookedTransformer
    units: list[int]
    """The pooled examples of the micro-batch, in row order."""
    nll: Float[torch.Tensor, " batch"]
    """Summed response NLL of each row."""
    resid: Float[torch.Tensor, "batch pos_minus_1 d_model"]
    """Final residuals of each row at every predicting position."""
    alt_nll: dict[tuple[int, ...], torch.Tensor]
    """Summed response NLL of each alternative row of the micro-batch, by its token ids."""


@dataclasses.dataclass
class ReferencePass:
    """Reference-model NLLs that objectives compute before training and share (by token ids)."""

    share_prompts: bool
    """Whether reference passes run each prompt once (see ``FinetuneConfig.share_prompts``)."""
    wanted: list[TeacherForced] = dataclasses.field(default_factory=list)
    """Rows whose reference NLL some objective needs."""
    nll: dict[tuple[int, ...], float] = dataclasses.field(default_factory=dict)
    """Reference NLLs computed so far."""

    def alternative_for(self, seq: TeacherForced) -> TeacherForced | None:
        """A wanted row that continues the prompt of ``seq`` with another response (computed in the same pass)."""
        head = seq.ids[:seq.prompt_len]
        for row in self.wanted:
            if row.prompt_len == seq.prompt_len and row.ids[:row.prompt_len] == head and row.ids != seq.ids:
                return row
        return None


class Objective:
    """Base class: a loss term over its own examples. Subclasses set ``name`` and implement :meth:`term`."""

    name = "objective"
    alternative_label: str | None = None
    """What the alternative responses are called (``None``: the objective has none)."""

    def __init__(self, examples: Sequence[tuple], weight: float = 1.0, alternatives: Sequence[str] | None = None):
        self.examples = check_examples(examples)
        if not (isinstance(weight, (int, float)) and weight > 0 and math.isfinite(weight)):
            raise MechsafeError(f"{self.name} weight={weight!r} must be a positive number (leave the objective out to "
                                "turn it off)")
        self.weight = float(weight)
        self.alternatives: list[str] | None = None
        if self.alternative_label is not None:
            alternatives = list(alternatives or [])
            if len(alternatives) != len(self.examples):
                raise MechsafeError(f"{self.name} needs one {self.alternative_label} response per example "
                                    f"({len(self.examples)} examples, {len(alternatives)} responses); fix the data")
            if not all(isinstance(t, str) and t.strip() for t in alternatives):
                raise MechsafeError(f"{self.name}'s {self.alternative_label} responses must be non-empty texts; fix the data")
            self.alternatives = alternatives
        self.units: list[int] = []
        self.seqs: list[TeacherForced] = []
        self.alt_seqs: list[TeacherForced] = []
        self._item: dict[int, int] = {}

    def bind(self, units: list[int], seqs: list[TeacherForced], alt_seqs: list[TeacherForced]) -> None:
        """Called by the trainer: the pooled example of each of this objective's examples, their tokenized
        sequences and the tokenized alternatives (the alternative response after the example's prompt and prefix)."""
        self.units, self.seqs, self.alt_seqs = units, seqs, alt_seqs
        self._item = {u: j for j, u in enumerate(units)}

    def reference_rows(self) -> list[TeacherForced]:
        """Rows whose reference NLL :meth:`prepare` will need (shared with other objectives' reference passes)."""
        return []

    def prepare(self, model: HookedTransformer, ref: ReferencePass) -> None:
        """Compute reference quantities from ``model`` before the first step (default: nothing)."""

    def rows(self, units: Sequence[int]) -> list[tuple[int, int]]:
        """``(row, item)`` for every row of ``units`` that is one of this objective's examples."""
        return [(r, self._item[u]) for r, u in enumerate(units) if u in self._item]

    def count(self, units: Sequence[int]) -> float:
        """What the term is averaged over in a step drawing ``units`` (default: the number of its examples)."""
        return float(sum(u in self._item for u in units))

    def alternative(self, item: int) -> TeacherForced | None:
        """The alternative row of example ``item`` (``None`` for objectives without alternatives)."""
        return self.alt_seqs[item] if self.alt_seqs else None

    def term(self, mb: MicroBatch, rows: list[tuple[int, int]]) -> torch.Tensor:
        """The term summed over ``rows`` (non-empty) of the micro-batch; differentiable."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings and data, for run manifests and resume fingerprints."""
        out: dict[str, Any] = {"name": self.name, "weight": self.weight,
                               "examples": [list(e if e[3] else e[:3]) for e in self.examples]}
        if self.alternatives is not None:
            out[self.alternative_label] = self.alternatives
        return out


class ResponseNLL(Objective):
    """Teacher-forced NLL of each example's response tokens (prompt and prefix masked): the supervised
    fine-tuning loss, averaged over the step's response tokens."""

    name = "nll"

    def count(self, units: Sequence[int]) -> float:
        return float(sum(len(self.seqs[self._item[u]]) - self.seqs[self._item[u]].prompt_len
                         for u in units if u in self._item))

    def term(self, mb: MicroBatch, rows: list[tuple[int, int]]) -> torch.Tensor:
        idx = [r for r, _ in rows]
        if idx == list(range(len(mb.units))):
            return mb.nll.sum()
        return mb.nll[torch.tensor(idx, device=mb.nll.device)].sum()


class RetainKL(Objective):
    """KL from the model before training to the trained model at every position of each example (prompt and
    response), over each reference distribution's ``top_k`` tokens plus one bucket for the rest
    (:mod:`mechsafe.finetune.retain`), averaged over the step's positions."""

    name = "retain_kl"

    def __init__(self, examples: Sequence[tuple], weight: float = 1.0, top_k: int = 64):
        super().__init__(examples, weight)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise MechsafeError(f"retain_kl top_k={top_k!r} must be a positive integer")
        self.top_k = top_k
        self.references: list[Reference] = []

    def prepare(self, model: HookedTransformer, ref: ReferencePass) -> None:
        alternatives = [ref.alternative_for(s) for s in self.seqs] if ref.share_prompts else None
        self.references = reference_topk(model, self.seqs, self.top_k, alternatives=alternatives)
        for j, r in enumerate(self.references):
            ref.nll[tuple(self.seqs[j].ids)] = r.response_nll
            if r.alternative_nll is not None:
                ref.nll[tuple(alternatives[j].ids)] = r.alternative_nll

    def count(self, units: Sequence[int]) -> float:
        return float(sum(self.references[self._item[u]].logp.shape[0] for u in units if u in self._item))

    def term(self, mb: MicroBatch, rows: list[tuple[int, int]]) -> torch.Tensor:
        return retain_kl_sum(mb.model, mb.resid, [r for r, _ in rows], [self.references[j] for _, j in rows])

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"top_k": self.top_k}


class Unlikelihood(Objective):
    """Sequence-level unlikelihood ``-log(1 - p)`` of a negative response after each example's prompt (Welleck et
    al., 2019, applied to a whole response opening): it pushes down continuations the model would actually give.
    The negative continues the example's prompt and prefix and gets no end of turn."""

    name = "unlikelihood"
    alternative_label = "negative"

    def __init__(self, examples: Sequence[tuple], negatives: Sequence[str], weight: float = 1.0):
        super().__init__(examples, weight, negatives)

    def term(self, mb: MicroBatch, rows: list[tuple[int, int]]) -> torch.Tensor:
        return unlikelihood(torch.stack([mb.alt_nll[tuple(self.alt_seqs[j].ids)] for _, j in rows])).sum()


class Preference(Objective):
    """DPO (Rafailov et al., 2023): each example's response preferred to its rejected response, relative to the
    model before training (:mod:`mechsafe.finetune.preference`). The rejected response continues the example's
    prompt and prefix and gets no end of turn."""

    name = "preference"
    alternative_label = "rejected"

    def __init__(self, examples: Sequence[tuple], rejected: Sequence[str], weight: float = 1.0, beta: float = 0.1):
        super().__init__(examples, weight, rejected)
        if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
            raise MechsafeError(f"preference beta={beta!r} must be a positive number, e.g. 0.1")
        self.beta = float(beta)
        self.pairs: list[Pair] = []

    def reference_rows(self) -> list[TeacherForced]:
        return self.seqs + self.alt_seqs

    def prepare(self, model: HookedTransformer, ref: ReferencePass) -> None:
        items = range(len(self.seqs))
        chosen = {j: ref.nll[tuple(self.seqs[j].ids)] for j in items if tuple(self.seqs[j].ids) in ref.nll}
        rejected = {j: ref.nll[tuple(self.alt_seqs[j].ids)] for j in items if tuple(self.alt_seqs[j].ids) in ref.nll}
        pairs = reference_pairs(model, self.seqs, dict(enumerate(self.alt_seqs)), chosen, rejected,
                                share_prompts=ref.share_prompts)
        self.pairs = [pairs[j] for j in items]

    def term(self, mb: MicroBatch, rows: list[tuple[int, int]]) -> torch.Tensor:
        idx = torch.tensor([r for r, _ in rows], device=mb.nll.device)
        rejected = torch.stack([mb.alt_nll[tuple(self.alt_seqs[j].ids)] for _, j in rows])
        return dpo_loss(mb.nll[idx], rejected, [self.pairs[j] for _, j in rows], self.beta).sum()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"beta": self.beta}


def unlikelihood(seq_nll: Float[torch.Tensor, " n"]) -> Float[torch.Tensor, " n"]:
    """Sequence-level unlikelihood ``-log(1 - p)`` of sequences whose probability is ``p = exp(-seq_nll)``.

    Zero where the sequence is already improbable and steep where it is likely, so minimizing it only
    pushes down continuations the model would actually produce.
    """
    s = seq_nll.clamp(min=1e-6)  # p = 1 would give an infinite loss
    # log(1 - e^-s), accurate for both small and large p (Maechler, 2012): expm1 near p = 1, log1p near p = 0
    return -torch.where(s < math.log(2), torch.log(-torch.expm1(-s)), torch.log1p(-torch.exp(-s)))
