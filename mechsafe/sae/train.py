"""Train an SAE with SAE-Lens on any hook point of a HookedTransformer.

The default (``route: cache``) caches per-token activations of the training texts once with
:func:`mechsafe.cache_activations` (``pooling=("tokens",)``: position 0 is dropped and the chat-template
prefix every prompt shares is kept once), then feeds SAE-Lens's ``SAETrainer`` from memory, several
seeded-shuffled epochs over the token pool. This avoids re-running the model every epoch, which on a
CPU is ~10x slower. ``route: runner`` hands a hub dataset to SAE-Lens's
``LanguageModelSAETrainingRunner`` instead (see :mod:`mechsafe.sae.runner`).

After training the SAE is evaluated on held-out prompts (:func:`mechsafe.sae.evaluate_sae`) and saved
in SAE-Lens's format plus mechsafe's metadata (:func:`mechsafe.sae.save_sae`)::

    model = ms.load_model("smollm2-135m-instruct")
    result = ms.sae.train_sae(model, ms.sae.load_recipe("sae/smollm2-resid-mid.yaml"), out_dir="runs/sae/mine")
    result.metrics.explained_variance
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe.activations import ActivationConfig, ActivationStore, cache_activations
from mechsafe.errors import MechsafeError
from mechsafe.hooks import hook_name as build_hook_name
from mechsafe.hooks import layer_of
from mechsafe.models import model_info
from mechsafe.runs import versions
from mechsafe.sae.config import SAETrainConfig, training_sae_config
from mechsafe.sae.evaluate import SAEMetrics, evaluate_sae
from mechsafe.sae.load import LoadedSAE, load_sae, save_sae
from mechsafe.sae.runner import run_runner
from mechsafe.sae.texts import eval_prompts, training_texts

logger = logging.getLogger(__name__)

FORMAT = 1


@dataclasses.dataclass
class TrainResult:
    """A trained, evaluated and saved SAE."""

    sae: LoadedSAE
    """The SAE as loaded back from ``path``."""
    metrics: SAEMetrics
    """Held-out evaluation."""
    path: Path
    """SAE directory (``cfg.json``, ``sae_weights.safetensors``, ``mechsafe_sae.json``, ``report.md``, ``run.json``)."""
    timings: dict[str, float]
    """Seconds spent caching, training and evaluating."""


class ShuffledBatches:
    """Endless batches from a token pool; each epoch is a fresh permutation seeded by ``seed + epoch``."""

    def __init__(self, pool: Float[torch.Tensor, "tokens d"], batch_size: int, seed: int):
        if pool.shape[0] < batch_size:
            raise MechsafeError(f"only {pool.shape[0]} training tokens for a batch of {batch_size}; "
                                "add training text or lower batch_size")
        self.pool, self.batch_size, self.seed = pool, batch_size, seed
        self.epoch, self._order, self._pos = 0, self._permutation(0), 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.pool.shape[0], generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> Float[torch.Tensor, "batch d"]:
        if self._pos + self.batch_size > self._order.numel():  # drop the ragged end of an epoch
            self.epoch += 1
            self._order, self._pos = self._permutation(self.epoch), 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.pool[idx]


def build_training_sae(config: SAETrainConfig, d_in: int, hook_name: str, model_name: str = ""):
    """A fresh SAE-Lens training SAE for ``config``, initialised from ``config.seed``."""
    from sae_lens.registry import get_sae_training_class

    sae_cls, _ = get_sae_training_class(config.architecture)
    sae_cfg = training_sae_config(config, d_in, hook_name, model_name)
    torch.manual_seed(config.seed)
    return sae_cls(sae_cfg)


def trainer_config(config: SAETrainConfig):
    """SAE-Lens ``SAETrainerConfig`` for ``config`` (no wandb, no checkpoints)."""
    from sae_lens.config import SAETrainerConfig

    steps = config.n_steps
    return SAETrainerConfig(
        total_training_samples=steps * config.batch_size, train_batch_size_samples=config.batch_size,
        lr=config.lr, lr_end=config.lr / 10, lr_scheduler_name=config.lr_scheduler,
        lr_warm_up_steps=min(config.lr_warm_up_steps, max(steps - 1, 0)), device=config.device,
        dead_feature_window=max(50, steps // 10), feature_sampling_window=max(steps, 1) + 1,
        n_batches_for_norm_estimate=20,
    )


def fit_sae(sae, pool: Float[torch.Tensor, "tokens d"], config: SAETrainConfig, progress: bool = True):
    """Train ``sae`` with SAE-Lens's ``SAETrainer`` on shuffled epochs of ``pool``.

    Returns the trained SAE (in eval mode, input scaling folded into its weights) and ``{"epochs", "steps"}``.
    """
    from sae_lens.training.sae_trainer import SAETrainer

    if not torch.isfinite(pool).all():
        raise MechsafeError("the training activations contain NaN or inf; check the model and its weight processing")
    batches = ShuffledBatches(pool, config.batch_size, config.seed)
    trainer = SAETrainer(cfg=trainer_config(config), sae=sae, data_provider=batches)
    scale = 1.0
    if sae.cfg.normalize_activations == "expected_average_only_in":
        # the exact mean norm of the whole pool, instead of SAE-Lens's estimate from a few batches
        scale = float(pool.shape[1] ** 0.5 / pool.norm(dim=-1).mean())
        trainer.activation_scaler.scaling_factor = scale
    if config.init_b_dec == "mean":
        # the residual stream has a large shared mean (~55% of the squared norm at the middle layer of the
        # embedded model); starting b_dec there keeps TopK from spending latents on it and leaves far fewer dead
        with torch.no_grad():
            sae.b_dec.copy_(pool.mean(0).to(sae.b_dec.dtype) * scale)
    if progress:
        trained = trainer.fit()
    else:  # SAE-Lens's trainer always draws a bar; silence it for this call only
        from functools import partial
        from unittest import mock

        import sae_lens.training.sae_trainer as sae_trainer_module

        with mock.patch.object(sae_trainer_module, "tqdm", partial(sae_trainer_module.tqdm, disable=True)):
            trained = trainer.fit()
    trained.eval()
    return trained, {"epochs": batches.epoch + batches._pos / max(pool.shape[0], 1), "steps": trainer.n_training_steps}


def token_pool(model: HookedTransformer, config: SAETrainConfig, hook: str, *,
               activation_root: str | os.PathLike | None = None, progress: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-token training activations at ``hook`` ([tokens, d]) and a description of where they came from."""
    if config.source.startswith("store:"):
        store = ActivationStore(Path(config.source[len("store:"):]).expanduser())
        if hook not in store.hooks or "tokens" not in store.poolings:
            raise MechsafeError(f"activation store {store.path} has no per-token activations at {hook}; "
                                "cache them with pooling tokens at this hook")
        n_texts = store.n_prompts
    else:
        texts = training_texts(config)
        acfg = ActivationConfig(hook=config.hook, layers=str(layer_of(hook)), pooling=("tokens",), chat=config.chat,
                                max_length=config.max_length)
        store = cache_activations(model, texts, acfg, root=activation_root, progress=progress)
        n_texts = len(texts)
    parts = [acts for acts, _, _ in store.iter_tokens(hook)]
    pool = torch.cat(parts).reshape(sum(p.shape[0] for p in parts), -1).float()
    return pool, {"source": config.source, "n_texts": n_texts, "n_tokens": int(pool.shape[0]), "store": str(store.path)}


def train_sae(model: HookedTransformer, config: SAETrainConfig, *, out_dir: str | os.PathLike | None = None,
              runs_dir: str | os.PathLike = "runs", activation_root: str | os.PathLike | None = None,
              progress: bool = True, command: str = "sae train") -> TrainResult:
    """Train, evaluate on held-out prompts and save an SAE at ``config``'s hook.

    Args:
        model: the HookedTransformer whose activations the SAE learns.
        config: what to train (see :class:`~mechsafe.sae.SAETrainConfig`).
        out_dir: SAE directory to write (replaced atomically); default ``runs_dir/sae/sae-<hook>-<arch>-<time>``.
        runs_dir: root for the default ``out_dir``.
        activation_root: activation-store root for the token cache (default ``$MECHSAFE_CACHE/activations``).
        progress: show progress bars.
        command: command recorded in ``run.json``.
    """
    name = build_hook_name(model, config.hook, config.layer)
    info = model_info(model)
    timings: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if config.route == "runner":
        trained, data_info = run_runner(model, config, name)
        fit_info: dict[str, Any] = {"steps": config.n_steps}
        timings["train"] = round(time.perf_counter() - t0, 2)
    else:
        pool, data_info = token_pool(model, config, name, activation_root=activation_root, progress=progress)
        timings["cache"] = round(time.perf_counter() - t0, 2)
        timings["cache_cpu"] = round(time.process_time() - c0, 2)
        logger.info("training %s SAE on %d cached tokens at %s", config.architecture, pool.shape[0], name)
        sae = build_training_sae(config, pool.shape[1], name, info.spec)
        t1, c1 = time.perf_counter(), time.process_time()
        trained, fit_info = fit_sae(sae, pool, config, progress=progress)
        timings["train"] = round(time.perf_counter() - t1, 2)
        timings["train_cpu"] = round(time.process_time() - c1, 2)
        del pool
    t2, c2 = time.perf_counter(), time.process_time()
    held_out = eval_prompts(config)
    metrics = evaluate_sae(model, LoadedSAE(trained, name), held_out, dense_threshold=config.dense_threshold)
    timings["evaluate"] = round(time.perf_counter() - t2, 2)
    timings["evaluate_cpu"] = round(time.process_time() - c2, 2)
    timings["total"] = round(time.perf_counter() - t0, 2)
    timings["total_cpu"] = round(time.process_time() - c0, 2)
    timings["torch_threads"] = torch.get_num_threads()
    timings["train_tokens_per_s"] = round(config.n_steps * config.batch_size / max(timings["train"], 1e-9), 1)
    metadata = {
        "format": FORMAT, "hook_name": name, "model": info.to_dict(), "weight_processing": info.processing,
        "training": dataclasses.asdict(config), "training_architecture": config.architecture,
        "data": {**data_info, **fit_info, "eval_data": config.eval_data, "eval_split": config.eval_split,
                 "eval_fingerprint": held_out.fingerprint()},
        "metrics": metrics.to_dict(), "timings_s": timings, "versions": versions(),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    if out_dir is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out_dir = Path(runs_dir) / "sae" / f"sae-{config.hook}{config.layer}-{config.architecture}-{stamp}"
    report = format_report(metadata, metrics)
    path = save_sae(trained, out_dir, metadata, extra_files={"report.md": report},
                    manifest=dict(command=command, config=config, seed=config.seed, processing=info.processing,
                                  timings=timings, extra={"hook_name": name, "metrics": metrics.to_dict()}))
    logger.info("saved SAE to %s (EV %.3f, CE +%.3f nats)", path, metrics.explained_variance, metrics.ce_increase)
    return TrainResult(sae=load_sae(path, device=config.device), metrics=metrics, path=path, timings=timings)


def format_report(metadata: dict[str, Any], metrics: SAEMetrics) -> str:
    """The ``report.md`` of a trained SAE: what was trained, on what, and its held-out metrics."""
    cfg, data, t = metadata["training"], metadata["data"], metadata["timings_s"]
    width = cfg["expansion_factor"]
    sparsity = {"topk": f"k={cfg['k']}", "batchtopk": f"mean k={cfg['k']}",
                "standard": f"L1 coefficient {cfg['l1_coefficient']}",
                "jumprelu": f"L0 coefficient {cfg['l0_coefficient']}"}[cfg["architecture"]]
    lines = [
        f"# SAE at `{metadata['hook_name']}`", "",
        f"- model: `{metadata['model']['spec']}` (weight processing: {metadata['weight_processing']})",
        f"- architecture: {cfg['architecture']} ({sparsity}), width {width}x (d_sae = {width} x d_in), seed {cfg['seed']}",
        f"- training: {cfg['training_tokens']:,} token activations in batches of {cfg['batch_size']} "
        f"(lr {cfg['lr']}, {cfg['lr_scheduler']}), route `{cfg['route']}`",
        f"- data: {data.get('n_texts', '?')} texts from `{data['source']}`, {data.get('n_tokens', '?')} cached tokens"
        + (f", {data['epochs']:.1f} epochs" if "epochs" in data else ""),
        "- time (s; *_cpu = process CPU seconds over all threads): "
        + ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("train_tokens_per_s", "torch_threads"))
        + f"; {t.get('train_tokens_per_s')} training tokens/s on {t.get('torch_threads')} torch threads"
        + (f"; {metadata['machine']['cpu_count']} CPUs, load average {metadata['machine']['loadavg_start'][0]:.1f} "
           f"at the start and {metadata['machine']['loadavg_end'][0]:.1f} at the end"
           if metadata.get("machine", {}).get("loadavg_start") else ""),
        "",
        f"## Held-out evaluation ({metadata['data']['eval_data']}, split {metadata['data']['eval_split']}, content tokens)",
        "", metrics.markdown(),
        "Dead = never fires on the evaluation tokens; dense = fires on more than "
        f"{100 * metrics.dense_threshold:.0f}% of them. CE is next-token cross-entropy on content-token targets with the "
        "SAE reconstruction (or zeros) spliced in at every position but the first.",
        "",
    ]
    return "\n".join(lines)
