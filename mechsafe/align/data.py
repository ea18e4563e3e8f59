"""The data mix of ``mechsafe align`` and the objectives it trains on.

* every harmful TRAIN prompt (and, with ``refusal_prompts``, every training-only harmful request) -> a refusal
  from :func:`mechsafe.data.refusals`, assigned by a seeded permutation, so the targets vary and the run is
  reproducible;
* every harmless TRAIN prompt (and, with ``answer_prompts``, every training-only harmless prompt) -> the base
  model's own greedy answer (``answer_tokens`` tokens, cached in the run directory). Answers the refusal matcher
  flags are dropped, so the base model's own over-refusals are not taught; an answer that used every allowed
  token was cut short and is not taught to end the turn.

Objectives (:mod:`mechsafe.finetune.objectives`), each on when its weight is positive:

* :class:`~mechsafe.finetune.ResponseNLL` on every example;
* :class:`~mechsafe.finetune.RetainKL` on the harmless examples: next-token distributions at every position held
  near the base model's, so the model learns to refuse without drifting elsewhere;
* :class:`~mechsafe.finetune.Unlikelihood` of each harmless example's refusal opening (the first
  ``negative_words`` words of a bundled refusal) after its prompt;
* :class:`~mechsafe.finetune.Preference`: each harmful example's refusal over the base model's own answer (when
  that answer is neither empty nor a refusal), each harmless example's answer over its refusal opening.

Both pools mix question-form and instruction-form prompts (``form`` in the bundled data), so the model cannot
learn "question about harm -> refuse, imperative -> comply".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mechsafe.align.config import AlignConfig
from mechsafe.data import answer_prompts, prompt_pool, refusal_prompts, refusals
from mechsafe.errors import MechsafeError
from mechsafe.evaluation import cached_answers, is_refusal
from mechsafe.finetune import Objective, Preference, ResponseNLL, RetainKL, Unlikelihood

ANSWERS_FILE = "base_answers.json"
"""Cache of the base model's greedy answers inside an align run directory."""


def cycled_order(size: int, n: int, seed: int) -> list[int]:
    """``n`` indices into ``size`` items: seeded permutations of them, one after another (each used ~equally)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order += [int(i) for i in rng.permutation(size)]
    return order[:n]


def assign_refusals(n: int, seed: int = 0) -> list[str]:
    """``n`` refusal targets: the bundled refusals in a seeded order, cycled (each used ~equally)."""
    texts = refusals()
    if not texts:
        raise MechsafeError("the bundled refusal responses are missing; reinstall mechsafe")
    return [texts[i] for i in cycled_order(len(texts), n, seed)]


def opening(text: str, words: int) -> str:
    """The first ``words`` whitespace-separated words of ``text``, joined by single spaces."""
    return " ".join(text.split()[:words])


def refusal_openings(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` refusal openings: the first ``words`` words of :func:`assign_refusals`' targets."""
    return [opening(r, words) for r in assign_refusals(n, seed)]


def harmful_training_prompts(config: AlignConfig) -> list[dict[str, str]]:
    """The harmful prompts ``align`` teaches to refuse, in training order (dicts ``id``, ``text``, ``form``)."""
    harmful = prompt_pool("harmful", "train", config.harmful_limit, config.seed)
    if config.refusal_prompts:
        harmful += [{"id": r["id"], "text": r["text"], "form": "refusal_prompts"} for r in refusal_prompts()]
    return harmful


def harmless_training_prompts(config: AlignConfig) -> list[dict[str, str]]:
    """The harmless prompts whose base answers ``align`` teaches, in training order."""
    harmless = prompt_pool("harmless", "train", config.harmless_limit, config.seed)
    if config.answer_prompts:
        harmless += [{"id": r["id"], "text": r["text"], "form": "answer_prompts"} for r in answer_prompts()]
    return harmless


def training_objectives(config: AlignConfig, model, run_dir: Path, progress: bool = True
                        ) -> tuple[list[Objective], dict[str, Any]]:
    """The objectives of the recipe (see the module docstring) and counts describing the mix."""
    harmful = harmful_training_prompts(config)
    harmless = harmless_training_prompts(config)
    answers_file = Path(run_dir) / ANSWERS_FILE
    answer = lambda prompts: cached_answers(model, prompts, config.answer_tokens, answers_file,  # noqa: E731
                                            config.generate_batch_size, progress)
    refused = [(p["text"], r) for p, r in zip(harmful, assign_refusals(len(harmful), config.seed))]
    base = answer(harmless)
    kept = [p for p in harmless if base[p["id"]].strip() and not is_refusal(base[p["id"]])]
    tok = model.tokenizer
    answered = []
    for p in kept:  # an answer that used every allowed token was cut short: do not teach it to end there
        text = base[p["id"]].strip()
        complete = len(tok(text, add_special_tokens=False)["input_ids"]) < config.answer_tokens - 1
        answered.append((p["text"], text, complete))
    openings = refusal_openings(len(answered), config.negative_words, config.seed)
    objectives: list[Objective] = [ResponseNLL(refused + answered)]
    mix: dict[str, Any] = {
        "harmful": {f: sum(p["form"] == f for p in harmful) for f in ("question", "instruction", "refusal_prompts")},
        "harmless": {f: sum(p["form"] == f for p in kept) for f in ("question", "instruction", "answer_prompts")},
        "harmless_dropped_refused_or_empty": len(harmless) - len(kept),
        "harmless_cut_short": sum(not complete for *_, complete in answered),
        "n_examples": len(refused) + len(answered),
    }
    if config.retain_weight > 0:
        objectives.append(RetainKL(answered, config.retain_weight, config.retain_top_k))
    if config.unlikelihood_weight > 0:
        objectives.append(Unlikelihood(answered, openings, config.unlikelihood_weight))
    if config.preference_weight > 0:  # refusal over the base model's own compliance, the answer over a refusal
        own = answer(harmful)
        chosen = [(ex, own[p["id"]].strip()) for ex, p in zip(refused, harmful)
                  if own[p["id"]].strip() and not is_refusal(own[p["id"]])]
        examples = [ex for ex, _ in chosen] + answered
        objectives.append(Preference(examples, [r for _, r in chosen] + openings, config.preference_weight,
                                     config.preference_beta))
        mix["preference_pairs"] = {"harmful": len(chosen), "harmful_skipped_refused_or_empty": len(harmful) - len(chosen),
                                   "harmless": len(answered)}
    return objectives, mix
