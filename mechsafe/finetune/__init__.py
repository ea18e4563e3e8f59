"""LoRA fine-tuning of ``HookedTransformer`` s through PEFT, with a response-only loss.

Attention and MLP weights are adapted by mechsafe's :class:`~mechsafe.finetune.lora.TransformerLensLora`,
a PEFT LoRA layer registered through PEFT's custom-module mapping: TransformerLens keeps its weights as
bare parameters and calls attention with keyword arguments only, and the layer adds each weight's
low-rank branch at TransformerLens's hook points (see :mod:`mechsafe.finetune.lora` and ``docs/finetune.md``).

Example::

    import mechsafe as ms
    from mechsafe.finetune import FinetuneConfig, finetune, response_nll

    model = ms.load_model("smollm2-135m-instruct", processing="none")
    pairs = [("How do I pick a lock?", "I can't help with that.")]
    result = finetune(model, pairs, FinetuneConfig(rank=8, steps=20, layers="middle"), run_dir="runs/ft")
    print(result.losses[-1], response_nll(model, pairs))
    ms.save_model(result.model, "runs/ft/model", base_model="smollm2-135m-instruct")
"""

from mechsafe.finetune.config import TARGETS, FinetuneConfig
from mechsafe.finetune.lora import adapted_weight, attach_lora, has_lora, merge_lora, remove_lora
from mechsafe.finetune.sequences import encode_examples, response_nll, sequence_nll
from mechsafe.finetune.trainer import FinetuneResult, example_order, finetune

__all__ = [
    "TARGETS",
    "FinetuneConfig",
    "FinetuneResult",
    "adapted_weight",
    "attach_lora",
    "encode_examples",
    "example_order",
    "finetune",
    "has_lora",
    "merge_lora",
    "remove_lora",
    "response_nll",
    "sequence_nll",
]
