"""Safety evaluation: batched generation, refusal detection and safety/utility metrics.

Example::

    import mechsafe as ms
    from mechsafe import evaluation as ev

    model = ms.load_model("smollm2-135m-instruct")
    harmful = ms.data.load("harmful").split("test").texts
    harmless = ms.data.load("harmless").split("test").texts
    texts = ev.generate(model, harmful[:4], max_new_tokens=32)
    flags = ev.refusal_flags(texts)                  # phrase matcher (or judge=ev.ModelJudge(judge_model))
    scores = ev.refusal_score(model, harmful)        # log-odds of a refusal-opening token, no generation
    result = ev.evaluate(model, harmful, harmless)   # EvalResult with bootstrap intervals
    print(result.markdown())

Modules: ``generation`` (generate, cached greedy answers, last-position logits), ``refusal`` (phrase matcher, refusal
score), ``metrics`` (evaluate, EvalResult, answer NLL, KL).
"""

from mechsafe.evaluation.generation import cached_answers, generate, pad_left, prompt_last_logits
from mechsafe.forward import last_logits
from mechsafe.evaluation.metrics import (
    EvalConfig,
    EvalResult,
    UTILITY_SUFFIX,
    answer_nll,
    evaluate,
    kl_divergence,
    last_number,
    record_split,
)
from mechsafe.evaluation.refusal import (
    JUDGE_QUESTION,
    REFUSAL_PHRASES,
    REFUSAL_START_WORDS,
    REFUSAL_WINDOW,
    ModelJudge,
    is_refusal,
    refusal_flags,
    refusal_score,
    refusal_token_ids,
    score_from_logits,
)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "JUDGE_QUESTION",
    "ModelJudge",
    "REFUSAL_PHRASES",
    "REFUSAL_START_WORDS",
    "REFUSAL_WINDOW",
    "UTILITY_SUFFIX",
    "answer_nll",
    "cached_answers",
    "evaluate",
    "generate",
    "is_refusal",
    "kl_divergence",
    "last_logits",
    "last_number",
    "pad_left",
    "prompt_last_logits",
    "record_split",
    "refusal_flags",
    "refusal_score",
    "refusal_token_ids",
    "score_from_logits",
]
