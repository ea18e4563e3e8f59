"""Sparse autoencoders (trained with SAE-Lens) on HookedTransformer hooks: training, evaluation, loading,
feature inspection and SAE-feature probes.

::

    import mechsafe as ms
    model = ms.load_model("smollm2-135m-instruct")
    result = ms.sae.train_sae(model, ms.sae.load_recipe("sae/smollm2-resid-mid.yaml"), out_dir="runs/sae/mine")
    sae = ms.sae.load_sae("runs/sae/mine")               # .hook_name, .encode(x), .decode(f), .metrics
    metrics = ms.sae.evaluate_sae(model, sae, ms.data.load("harmful_vs_harmless").split("test"))
    with ms.sae.splice_sae(model, sae):                  # the SAE's reconstruction replaces the hook
        logits = model(tokens)

Modules: ``config`` (recipes), ``texts`` (training text, held-out prompts), ``train``, ``runner``
(SAE-Lens's streaming runner), ``evaluate``, ``load``, ``features`` (SAE-feature probes), ``inspect``.
"""

from mechsafe.sae.config import ARCHITECTURES, SAETrainConfig, load_recipe, make_config
from mechsafe.sae.evaluate import SAEMetrics, evaluate_sae, splice_sae, zero_ablate
from mechsafe.sae.features import sae_features
from mechsafe.sae.inspect import FeatureReport, inspect_features, logit_effect
from mechsafe.sae.load import LoadedSAE, load_sae, save_sae
from mechsafe.sae.train import TrainResult, train_sae

__all__ = [
    "ARCHITECTURES",
    "FeatureReport",
    "LoadedSAE",
    "SAEMetrics",
    "SAETrainConfig",
    "TrainResult",
    "evaluate_sae",
    "inspect_features",
    "load_recipe",
    "load_sae",
    "logit_effect",
    "make_config",
    "sae_features",
    "save_sae",
    "splice_sae",
    "train_sae",
    "zero_ablate",
]
