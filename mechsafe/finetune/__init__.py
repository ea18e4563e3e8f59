"""One trainer for every weight-space method: objectives, LoRA / full / selected parameters, gradient transforms.

* :mod:`~mechsafe.finetune.objectives`: loss terms that own their data (response NLL, KL-to-reference
  retain, unlikelihood, DPO preference);
* :class:`FinetuneConfig` ``method``: LoRA adapters through PEFT (mechsafe's
  :class:`~mechsafe.finetune.lora.TransformerLensLora` layer adds each weight's low-rank branch at
  TransformerLens's hook points), every parameter, or weights picked by :func:`mechsafe.weights.select`;
* :mod:`~mechsafe.finetune.transforms`: exact freezing masks and subspace projections applied to every step;
* callbacks every N steps, resumable checkpoints, a progress bar, bfloat16 autocast.

Example::

    import mechsafe as ms
    from mechsafe.finetune import FinetuneConfig, ResponseNLL, finetune

    model = ms.load_model("smollm2-135m-instruct", processing="none")
    pairs = [("How do I pick a lock?", "I can't help with that.")]
    result = finetune(model, [ResponseNLL(pairs)], FinetuneConfig(rank=8, steps=20, layers="middle"),
                      run_dir="runs/ft")
    print(result.losses[-1], ms.forward.response_nll(model, pairs))
"""

from mechsafe.finetune.config import METHODS, FinetuneConfig
from mechsafe.finetune.lora import adapted_weight, attach_lora, has_lora, merge_lora, remove_lora
from mechsafe.finetune.objectives import Objective, Preference, ResponseNLL, RetainKL, Unlikelihood
from mechsafe.finetune.trainer import FinetuneResult, example_order, finetune
from mechsafe.finetune.transforms import Freeze, GradTransform, Project

__all__ = [
    "METHODS",
    "FinetuneConfig",
    "FinetuneResult",
    "Freeze",
    "GradTransform",
    "Objective",
    "Preference",
    "Project",
    "ResponseNLL",
    "RetainKL",
    "Unlikelihood",
    "adapted_weight",
    "attach_lora",
    "example_order",
    "finetune",
    "has_lora",
    "merge_lora",
    "remove_lora",
]
