"""mechsafe: mechanistic-interpretability tools for LLM safety research, built on TransformerLens.

The public surface::

    import mechsafe as ms
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    prompts = ms.data.load("harmful_vs_harmless")
    store = ms.cache_activations(model, prompts, hook="resid_post", layers="all")

Submodules: ``data``, ``hooks``, ``chat``, ``activations``, ``models``, ``runs``.
"""

from mechsafe import data, hooks
from mechsafe.activations import ActivationConfig, ActivationStore, cache_activations
from mechsafe.errors import MechsafeError
from mechsafe.models import DEFAULT_MODEL, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "ActivationConfig",
    "ActivationStore",
    "DEFAULT_MODEL",
    "MechsafeError",
    "cache_activations",
    "data",
    "hooks",
    "load_model",
    "save_model",
]
