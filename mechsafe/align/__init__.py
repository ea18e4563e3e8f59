"""``mechsafe align``: a safety-tuned test model made by LoRA on refusal data.

SmolLM2-135M-Instruct refuses only a minority of harmful requests, which makes it a poor test bed for studies
of how safety breaks (SNIP pruning, attacks, drift, WaRP, MFS). The recipe fine-tunes it with LoRA on the bundled
TRAIN split against four objectives (:mod:`mechsafe.align.data`), saves the merged model with its provenance and
evaluates base vs aligned on a held-out split (:mod:`mechsafe.align.report`): refusal rate on harmful prompts,
over-refusal on harmless ones (per form too), arithmetic accuracy, NLL of reference instruction answers and of the
base model's answers to the held-out harmless prompts, and KL(base ‖ aligned) on harmless prompts.

``load_model("smollm2-135m-aligned")`` builds the default recipe once per machine and caches it
(:func:`~mechsafe.align.run.aligned_checkpoint`).

Example::

    from mechsafe.align import AlignConfig, align
    result = align(AlignConfig(), out="runs/aligned/model")
    print(result.report)
"""

from mechsafe.align.config import AlignConfig, default_finetune_config
from mechsafe.align.data import (ANSWERS_FILE, assign_refusals, harmful_training_prompts, harmless_training_prompts,
                                 opening, refusal_openings, training_objectives)
from mechsafe.align.report import evaluate_pair, report_markdown
from mechsafe.align.run import ALIGNED_SPEC, DEFAULT_OUT, AlignResult, align, aligned_checkpoint, code_fingerprint, train

__all__ = [
    "ALIGNED_SPEC",
    "ANSWERS_FILE",
    "DEFAULT_OUT",
    "AlignConfig",
    "AlignResult",
    "align",
    "aligned_checkpoint",
    "assign_refusals",
    "code_fingerprint",
    "default_finetune_config",
    "evaluate_pair",
    "harmful_training_prompts",
    "harmless_training_prompts",
    "opening",
    "refusal_openings",
    "report_markdown",
    "train",
    "training_objectives",
]
