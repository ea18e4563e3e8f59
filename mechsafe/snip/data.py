"""The (prompt, response) pairs SNIP scores are computed on.

* **safety**: harmful requests (the TRAIN split of the bundled harmful prompts and the training-only bundled
  refusal prompts; never a held-out prompt) with the scored model's *own* refusals: greedy responses, cached,
  kept when the refusal matcher calls them refusals (``responses="own"``), or with the bundled refusals;
* **utility**: harmless requests (the TRAIN split of the bundled harmless prompts and the training-only answer
  prompts) with the model's own answers, kept when the matcher does *not* call them refusals, or the TRAIN split
  of the bundled instructions with their reference answers (``responses="bundled"``);
* a local file or hub dataset with prompt and response columns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from transformer_lens import HookedTransformer

from mechsafe import data
from mechsafe.errors import MechsafeError
from mechsafe.evaluation.generation import cached_answers
from mechsafe.evaluation.metrics import record_split
from mechsafe.evaluation.refusal import is_refusal
from mechsafe.runs import stable_hash
from mechsafe.snip.config import ScoreConfig

logger = logging.getLogger(__name__)


def candidate_prompts(kind: str) -> list[dict[str, str]]:
    """The training prompts scoring may use: ``safety`` (harmful) or ``utility`` (harmless), as dicts ``id``, ``text``."""
    if kind == "safety":
        extra = data.refusal_prompts()
    else:
        extra = data.answer_prompts()
    pool = data.prompt_pool("harmful" if kind == "safety" else "harmless", "train")
    return [{"id": p["id"], "text": p["text"]} for p in pool] + [{"id": p["id"], "text": p["text"]} for p in extra]


def _own_pairs(model: HookedTransformer, kind: str, config: ScoreConfig, cache: Path,
               progress: bool) -> list[tuple[str, str]]:
    prompts = candidate_prompts(kind)
    order = np.random.default_rng(config.seed).permutation(len(prompts))
    path = cache / f"answers-{kind}-{stable_hash(config.system)}-{stable_hash(prompts)}.json"
    want_refusal = kind == "safety"
    pairs: list[tuple[str, str]] = []
    start = 0
    while len(pairs) < config.n_samples and start < len(order):  # answer in chunks until enough pass the matcher
        size = max(8, round(1.25 * (config.n_samples - len(pairs))))  # what is missing, with a margin
        chunk = [prompts[i] for i in order[start:start + size]]
        start += size
        answers = cached_answers(model, chunk, config.max_new_tokens, path, progress=progress)
        pairs += [(p["text"], answers[p["id"]]) for p in chunk
                  if answers[p["id"]].strip() and is_refusal(answers[p["id"]]) == want_refusal]
    if not pairs:
        raise MechsafeError(f"the model gave no {'refusal' if want_refusal else 'answer'} to the {kind} prompts; "
                            "score with the bundled responses instead (--responses bundled)")
    if len(pairs) < config.n_samples:
        logger.warning("only %d of %d own %s responses passed the refusal matcher; scoring those", len(pairs),
                       config.n_samples, kind)
    return pairs[: config.n_samples]


def _bundled_pairs(kind: str, config: ScoreConfig) -> list[tuple[str, str]]:
    rng = np.random.default_rng(config.seed)
    if kind == "safety":
        prompts, refusals = candidate_prompts("safety"), data.refusals()
        order = rng.permutation(len(prompts))[: config.n_samples]
        return [(prompts[i]["text"], refusals[j % len(refusals)]) for j, i in enumerate(order)]
    items = record_split(data.instructions(), "train")
    order = rng.permutation(len(items))[: config.n_samples]
    return [(items[i]["instruction"], items[i]["answer"]) for i in order]


def scoring_pairs(model: HookedTransformer, config: ScoreConfig, cache: Path, progress: bool = True
                  ) -> tuple[list[tuple[str, str]], str]:
    """The (prompt, response) pairs ``config`` names, and a line saying what they are."""
    if config.data in ("safety", "safety-short", "utility"):
        kind = "utility" if config.data == "utility" else "safety"
        if config.responses == "own":
            pairs = _own_pairs(model, kind, config, cache, progress)
        else:
            pairs = _bundled_pairs(kind, config)
        return pairs, f"{len(pairs)} bundled {kind} prompts with {config.responses} responses"
    pairs, where = data.load_pairs(config.data, config.prompt_column, config.response_column)
    rng = np.random.default_rng(config.seed)
    if len(pairs) > config.n_samples:
        pairs = [pairs[i] for i in sorted(rng.permutation(len(pairs))[: config.n_samples])]
    return pairs, f"{len(pairs)} of {where}"
