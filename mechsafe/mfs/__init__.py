"""Massive feature superposition: many sparse safety features attached through hooks, read by product keys, and
aggregated by an error-correcting code (detector mode: the bank reads the model without changing it)."""

from mechsafe.mfs.aggregate import RULES, aggregate, group_code, group_scores, tolerance
from mechsafe.mfs.bank import (FEATURE_TYPES, FeatureType, SafetyBank, SubBankSpec, load_bank, register_feature_type,
                               run_with_bank, save_bank)
from mechsafe.mfs.config import BankConfig, TrainConfig
from mechsafe.mfs.keys import ProductKeys
from mechsafe.mfs.train import (PromptInputs, auroc, build_bank, feature_importance, prompt_inputs, removal_curve,
                                scores_of, train_bank)

__all__ = ["FEATURE_TYPES", "RULES", "BankConfig", "FeatureType", "ProductKeys", "PromptInputs", "SafetyBank",
           "SubBankSpec", "TrainConfig", "aggregate", "auroc", "build_bank", "feature_importance", "group_code",
           "group_scores", "load_bank", "prompt_inputs", "register_feature_type", "removal_curve", "run_with_bank",
           "save_bank", "scores_of", "tolerance", "train_bank"]
