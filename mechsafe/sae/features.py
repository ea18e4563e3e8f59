"""SAE features of prompts: per-token latents pooled per prompt.

Features are computed per token, then pooled (never encoded from a pooled vector): the hook's
per-token activations come from the activation store (a forward pass that stops after the hook's
layer), each token is encoded by the SAE, and the latents are pooled per prompt:

* ``last`` — latents of the last prompt token (the post-instruction position);
* ``mean`` — mean latents over the user's content tokens;
* ``binsum`` — number of content tokens on which each latent fires (binarized, summed).

The SAE-feature probes built on them live in :mod:`mechsafe.probes.sae_probes`.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.activations import ActivationConfig, cache_activations
from mechsafe.data import PromptSet
from mechsafe.errors import MechsafeError
from mechsafe.hooks import check_hook, kind_of, layer_of
from mechsafe.models import model_info
from mechsafe.sae.load import LoadedSAE, as_loaded

logger = logging.getLogger(__name__)

FEATURE_POOLINGS = ("last", "mean", "binsum")


@torch.no_grad()
def sae_features(model: HookedTransformer, sae, prompts: PromptSet | Sequence[str], *,
                 poolings: Sequence[str] = FEATURE_POOLINGS, activation_root: str | os.PathLike | None = None,
                 chat_template: bool = True, system: str | None = None, max_length: int = 512, batch_size: int = 16,
                 progress: bool = False, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Pooled SAE latents of every prompt: ``{pooling: float32 array [n_prompts, d_sae]}`` in prompt order."""
    loaded: LoadedSAE = as_loaded(sae)
    bad = [p for p in poolings if p not in FEATURE_POOLINGS]
    if bad or not poolings:
        raise MechsafeError(f"unknown SAE feature pooling {bad or list(poolings)}; choose from {', '.join(FEATURE_POOLINGS)}")
    name = check_hook(model, loaded.hook_name)
    texts = list(prompts.texts if isinstance(prompts, PromptSet) else prompts)
    if not texts:
        raise MechsafeError("no prompts to compute SAE features for")
    spec = loaded.metadata.get("model", {}).get("spec")
    if spec and spec != model_info(model).spec:
        logger.warning("SAE was trained on %s but features are read from %s", spec, model_info(model).spec)
    cfg = ActivationConfig(hook=kind_of(name), layers=str(layer_of(name)), pooling=("tokens",), batch_size=batch_size,
                           chat=chat_template, system=system, max_length=max_length)
    store = cache_activations(model, texts, cfg, root=activation_root, progress=progress)
    encoded = chat.encode_prompts(model.tokenizer, texts, system=system, chat=chat_template, max_length=max_length)
    last_pos = torch.tensor([len(e) - 1 for e in encoded])
    starts = torch.tensor([e.content[0] for e in encoded])
    stops = torch.tensor([e.content[1] for e in encoded])
    n, d = len(texts), loaded.d_sae
    last = torch.zeros(n, d)
    total = torch.zeros(n, d, dtype=torch.float64)
    fired = torch.zeros(n, d, dtype=torch.float64)
    seen_last = torch.zeros(n, dtype=torch.bool)
    for acts, prompt_idx, position in store.iter_tokens(name):
        acts = acts.reshape(acts.shape[0], -1)
        if acts.shape[1] != loaded.d_in:
            raise MechsafeError(f"the SAE expects {loaded.d_in}-dim inputs but {name} has {acts.shape[1]}; "
                                "use the model and hook the SAE was trained on")
        for lo in range(0, acts.shape[0], chunk):
            f = loaded.encode(acts[lo:lo + chunk].to(loaded.sae.device)).float().cpu()
            idx, pos = prompt_idx[lo:lo + chunk], position[lo:lo + chunk]
            is_last = pos == last_pos[idx]
            last[idx[is_last]] = f[is_last]
            seen_last[idx[is_last]] = True
            content = (pos >= starts[idx]) & (pos < stops[idx])
            total.index_add_(0, idx[content], f[content].double())
            fired.index_add_(0, idx[content], (f[content] > 0).double())
    if not bool(seen_last.all()):
        raise MechsafeError("the activation store lacks some prompts' last token; delete the store and cache again")
    out = {}
    if "last" in poolings:
        out["last"] = last.numpy().astype(np.float32)
    if "mean" in poolings:
        out["mean"] = (total / (stops - starts).clamp_min(1)[:, None].double()).numpy().astype(np.float32)
    if "binsum" in poolings:
        out["binsum"] = fired.numpy().astype(np.float32)
    return out
