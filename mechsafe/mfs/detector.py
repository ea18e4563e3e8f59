"""Detector mode: the bank scores each prompt, and above a threshold a response policy applies during generation.

Threat model: a closed deployment. The attacker sends prompts but cannot read or edit the weights or the code; the
bank is a separate module that an attacker with open weights removes at zero cost (the ``structural`` attack of
:mod:`mechsafe.attacks`), so its protection means nothing there.

Policies: ``refuse`` prefills a refusal opening and lets the model continue it; ``steer`` adds ``coeff`` times a
refusal direction to the residual stream at a layer while the flagged prompts' responses are generated.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformer_lens import HookedTransformer

from mechsafe.chat import format_prompt
from mechsafe.errors import MechsafeError
from mechsafe.evaluation.generation import generate
from mechsafe.mfs.bank import SafetyBank
from mechsafe.mfs.train import prompt_inputs, scores_of

POLICIES = ("refuse", "steer")
OPENING = "I can't help with that."


def guarded_generate(model: HookedTransformer, bank: SafetyBank, prompts: Sequence[str], threshold: float = 0.0,
                     policy: str = "refuse", opening: str = OPENING, direction: torch.Tensor | None = None,
                     layer: int | None = None, coeff: float = 8.0, max_new_tokens: int = 48,
                     batch_size: int = 8) -> list[dict[str, Any]]:
    """Each prompt's bank score, whether it was flagged (score above ``threshold``) and the response: the model's
    own for unflagged prompts, the policy's for flagged ones."""
    if policy not in POLICIES:
        raise MechsafeError(f"unknown response policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "steer" and (direction is None or layer is None):
        raise MechsafeError("the steer policy needs a refusal direction and its layer (mechsafe refusal-direction)")
    prompts = list(prompts)
    scores = scores_of(bank, prompt_inputs(model, bank, prompts, batch_size))
    flagged = [i for i, s in enumerate(scores) if s > threshold]
    plain = [i for i in range(len(prompts)) if i not in set(flagged)]
    responses: dict[int, str] = {}
    if plain:
        out = generate(model, [prompts[i] for i in plain], max_new_tokens, batch_size, progress=False)
        responses.update(zip(plain, out))
    if flagged and policy == "refuse":
        texts = [format_prompt(model.tokenizer, prompts[i]) + opening for i in flagged]
        out = generate(model, texts, max_new_tokens, batch_size, progress=False, chat=False)
        responses.update((i, opening + o) for i, o in zip(flagged, out))
    elif flagged:
        from mechsafe.interventions import steer

        with steer(model, direction, layer, coeff=coeff):
            out = generate(model, [prompts[i] for i in flagged], max_new_tokens, batch_size, progress=False)
        responses.update(zip(flagged, out))
    return [{"prompt": p, "score": float(s), "flagged": bool(s > threshold), "response": responses[i]}
            for i, (p, s) in enumerate(zip(prompts, scores))]
