"""The streaming route: SAE-Lens's ``LanguageModelSAETrainingRunner`` on the training texts.

The runner re-runs the model on fresh text for every batch, which suits large hub datasets (every
token seen once) but is ~10x slower than the cached route on a CPU when texts are few and reused
for several epochs. The texts of ``config.source`` are handed over as an in-memory dataset, packed
into ``context_size``-token sequences by SAE-Lens; position 0 of each sequence is skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.models import model_info
from mechsafe.sae.config import SAETrainConfig, training_sae_config
from mechsafe.sae.texts import training_texts

logger = logging.getLogger(__name__)


def hook_dim(model: HookedTransformer, hook_name: str) -> int:
    """Flattened size of one position's activation at ``hook_name`` (one short forward pass)."""
    from mechsafe.hooks import check_hook, layer_of

    check_hook(model, hook_name)
    seen: dict[str, int] = {}

    def grab(act, hook):
        seen["d"] = int(act[0, 0].numel())

    with torch.no_grad():
        model.run_with_hooks(torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device),
                             fwd_hooks=[(hook_name, grab)], stop_at_layer=layer_of(hook_name) + 1)
    return seen["d"]


def runner_config(model: HookedTransformer, config: SAETrainConfig, hook_name: str):
    """SAE-Lens ``LanguageModelSAERunnerConfig`` for ``config`` (no wandb, no checkpoints, nothing written)."""
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig

    if hook_name.endswith("hook_z"):
        raise MechsafeError("the runner route does not handle attention hook_z; use route: cache")
    sae_cfg = training_sae_config(config, hook_dim(model, hook_name), hook_name, model_info(model).spec)
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=model_info(model).spec, hook_name=hook_name,
        dataset_path=config.source, is_dataset_tokenized=False, streaming=False,
        context_size=config.context_size, training_tokens=config.training_tokens,
        train_batch_size_tokens=config.batch_size, store_batch_size_prompts=8, n_batches_in_buffer=4,
        seqpos_slice=(1, None), prepend_bos=bool(model.cfg.default_prepend_bos),
        lr=config.lr, lr_scheduler_name=config.lr_scheduler, lr_warm_up_steps=config.lr_warm_up_steps,
        dead_feature_window=max(50, config.n_steps // 10), feature_sampling_window=config.n_steps + 1,
        n_batches_for_norm_estimate=20, seed=config.seed, device=config.device, dtype="float32",
        logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None, verbose=False,
    )


def run_runner(model: HookedTransformer, config: SAETrainConfig, hook_name: str) -> tuple[Any, dict[str, Any]]:
    """Train with ``LanguageModelSAETrainingRunner``; returns the trained SAE and a data description."""
    import datasets
    from sae_lens import LanguageModelSAETrainingRunner

    texts = training_texts(config)
    cfg = runner_config(model, config, hook_name)
    torch.manual_seed(config.seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model,
                                            override_dataset=datasets.Dataset.from_dict({"text": texts}))
    sae = runner.run()
    sae.eval()
    return sae, {"source": config.source, "n_texts": len(texts), "route": "runner"}
