"""WaRP (Kim et al., ICLR 2023) for LLM safety: protect the weight directions safety depends on while fine-tuning.

* phase 1, :func:`compute_basis`: per protected weight, the eigenbasis ``U`` of its input covariance on safety data;
* phase 2, :func:`compute_importance` and :func:`make_masks`: ``Σ_batches |∂L/∂W̃|`` of the rotated coefficients
  ``W̃ = W U`` and the masks of the most important ones;
* phase 3, :func:`protected_finetune`: fine-tuning with the masked coefficients frozen (:class:`RotatedFreeze`);
* peers (:func:`safe_lora`) and the comparison (:func:`mechsafe.warp.compare.run_compare`).
"""

from mechsafe.warp.basis import Basis, compute_basis, protected_weights, safety_sequences
from mechsafe.warp.config import LAYER_TYPES, CompareConfig, WarpConfig
from mechsafe.warp.importance import (coefficients, compute_importance, from_coefficients, load_masks, make_masks,
                                      save_masks)
from mechsafe.warp.protect import RotatedFreeze, protected_config, protected_finetune
from mechsafe.warp.safelora import projector, safe_lora

__all__ = ["LAYER_TYPES", "Basis", "CompareConfig", "RotatedFreeze", "WarpConfig", "coefficients", "compute_basis",
           "compute_importance", "from_coefficients", "load_masks", "make_masks", "projector", "protected_config",
           "protected_finetune", "protected_weights", "safe_lora", "safety_sequences", "save_masks"]
