"""Attack data without harmful text in the repository, and the disjointness of attack and evaluation prompts.

* **harmful pairs**: harmful requests (the TRAIN split of the bundled harmful prompts, or a local file) with the
  *unaligned* base model's own answers: greedy, cached by model, kept when the refusal matcher does not call them
  refusals and they have at least ``min_words`` words;
* **benign pairs** (Qi et al. 2023's benign fine-tuning attack): the TRAIN splits of the bundled instructions and
  arithmetic problems with their reference answers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from transformer_lens import HookedTransformer

from mechsafe import data
from mechsafe.errors import MechsafeError
from mechsafe.evaluation.generation import cached_answers
from mechsafe.evaluation.metrics import record_split
from mechsafe.evaluation.refusal import is_refusal
from mechsafe.models import cache_dir
from mechsafe.runs import stable_hash

logger = logging.getLogger(__name__)


def harmful_requests(source: str | None = None, text_column: str | None = None) -> list[dict[str, str]]:
    """Harmful requests attacks train on (dicts ``id``, ``text``): the bundled training prompts, or a local file."""
    if source:
        texts, _ = data.load_texts(source, "all", text_column)
        return [{"id": f"{Path(source).name}:{i}", "text": t} for i, t in enumerate(texts)]
    return [{"id": r["id"], "text": r["text"]} for r in data.prompt_pool("harmful", "train")]


def compliant_pairs(base: HookedTransformer, requests: Sequence[dict[str, str]], max_new_tokens: int = 64,
                    min_words: int = 12, progress: bool = True, cache: Path | None = None) -> list[tuple[str, str]]:
    """``(request, answer)`` pairs where the base model complied: its greedy answer of at most ``max_new_tokens``
    tokens is not a refusal and has at least ``min_words`` words (generated once and cached under ``cache``, default
    ``$MECHSAFE_CACHE/attacks/answers``; answers cached with more tokens are cut)."""
    path = Path(cache or cache_dir() / "attacks" / "answers") / f"compliant-{stable_hash([r['text'] for r in requests])}.json"
    answers = cached_answers(base, list(requests), max_new_tokens, path, progress=progress)
    pairs = [(r["text"], answers[r["id"]].strip()) for r in requests
             if not is_refusal(answers[r["id"]]) and len(answers[r["id"]].split()) >= min_words]
    if not pairs:
        raise MechsafeError("the base model complied with none of the harmful requests; pass a less safe base model "
                            "(--base) or a file of requests it answers")
    logger.info("%d of %d harmful requests answered by the base model", len(pairs), len(requests))
    return pairs


def benign_pairs() -> list[tuple[str, str]]:
    """Benign (instruction, reference answer) pairs: the TRAIN splits of the bundled instructions and arithmetic."""
    items = [(i["instruction"], i["answer"]) for i in record_split(data.instructions(), "train")]
    return items + [(m["question"], str(m["answer"])) for m in record_split(data.math_problems(), "train")]


def draw(pool: Sequence, n: int, seed: int) -> list:
    """``n`` items of ``pool`` (all when it has fewer), drawn without replacement by ``seed``, in pool order."""
    rng = np.random.default_rng(seed)
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]


def check_held_out(requests: Sequence[dict[str, str]], held_out: Sequence[str]) -> None:
    """Raise when a held-out prompt is also a harmful request or a benign prompt attacks train on."""
    check_disjoint([r["text"] for r in requests] + [p for p, _ in benign_pairs()], held_out)


def check_disjoint(attack_prompts: Sequence[str], eval_prompts: Sequence[str]) -> None:
    """Raise when an evaluation prompt is also an attack prompt (compared after normalizing case and spaces)."""
    def norm(t: str) -> str:
        return " ".join(t.lower().split())

    shared = {norm(t) for t in attack_prompts} & {norm(t) for t in eval_prompts}
    if shared:
        example = next(iter(shared))
        raise MechsafeError(f"{len(shared)} evaluation prompts are also attack prompts (e.g. {example[:60]!r}); "
                            "evaluate on held-out prompts (the test split) or remove them from the attack data")
