"""mechsafe: mechanistic-interpretability tools for LLM safety research, built on TransformerLens.

The public surface::

    import mechsafe as ms
    model = ms.load_model("smollm2-135m-instruct", processing="none")
    prompts = ms.data.load("harmful_vs_harmless")
    store = ms.cache_activations(model, prompts, hook="resid_post", layers="all")
    result = ms.probe_bench("probes/harmful_vs_harmless.yaml")
    out = ms.report(["smollm2-135m-instruct", "smollm2-135m-aligned"], ms.reporting.ReportConfig(profile="quick"))
    with ms.interventions.ablate_direction(model, direction):
        out = ms.evaluation.generate(model, prompts.texts[:4])

Heavier subpackages (``probes``, ``sae``, ``evaluation``, ``interventions``, ``directions``,
``finetune``, ``align``, ``snip``, ``reporting``, ``weights``, ``forward``, ``distributed``) are imported on first attribute access.
"""

import importlib

from mechsafe import data, hooks
from mechsafe.activations import ActivationConfig, ActivationStore, cache_activations
from mechsafe.errors import MechsafeError
from mechsafe.models import DEFAULT_MODEL, load_model, save_model

__version__ = "0.1.0"

_LAZY_MODULES = ("activations", "align", "attacks", "chat", "directions", "distributed", "evaluation", "finetune", "forward",
                 "interventions", "models", "probes", "reporting", "runs", "sae", "snip", "stats", "weights")
_LAZY_FUNCTIONS = {"probe_bench": "mechsafe.probes", "report": "mechsafe.reporting"}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"mechsafe.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'mechsafe' has no attribute {name!r}")


__all__ = [
    "ActivationConfig",
    "ActivationStore",
    "DEFAULT_MODEL",
    "MechsafeError",
    "cache_activations",
    "data",
    "hooks",
    "load_model",
    "probe_bench",
    "report",
    "save_model",
    *_LAZY_MODULES,
]
