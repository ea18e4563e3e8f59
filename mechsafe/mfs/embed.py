"""Embedded mode: safety features compiled into the model's own weights as extra MLP neurons.

Each chosen block's MLP grows by ``n_l`` neurons (``n_features`` split as evenly as the blocks allow). An added
neuron is an ordinary neuron of that MLP: it reads the block's normalized MLP input through its own ``W_in`` (and
``W_gate``) column and writes its ``W_out`` row into the residual stream. TransformerLens and Hugging Face configs
give every block one MLP width, so every block is widened to the largest ``n_l`` and the neurons a block does not
use (all of them in blocks that are not chosen) stay exactly zero. The result is an ordinary checkpoint
(``hf/config.json``'s intermediate size is the new width) that :func:`mechsafe.load_model` reads; an attacker with
the weights sees one wider MLP per block.

Training (:func:`embed`) uses the shared trainer (:func:`mechsafe.finetune.finetune`, method ``selected`` on the
MLP weights of the chosen blocks) with the original neurons frozen (:class:`~mechsafe.finetune.Freeze`: bit-identical),
so only the added neurons learn. Objectives, in the terms of the seed's multi-objective loss:

* safety and LM preservation: the align recipe's objectives on its data mix
  (:func:`mechsafe.align.data.training_objectives`): refusals of harmful TRAIN prompts and the base model's own
  answers to harmless ones (response NLL), KL to the original model on the harmless examples (RetainKL),
  unlikelihood of a refusal opening after harmless prompts, and the preference term. The plain aligned model is
  trained on exactly this mix with LoRA on every block, so the two models differ in where their safety lives;
* diversity: the mean squared cosine between the write directions (``W_out`` rows) of the added neurons of each
  block (0 when they are orthogonal, 1 when they are one direction), averaged over blocks;
* sparsity: the mean absolute activation of the added neurons over every computed position;
* robustness: in every training forward (torch's global generator, seeded, saved in the trainer's checkpoints) a random ``feature_dropout`` share of the added neurons and every neuron of
  a random ``group_dropout`` share of ``n_groups`` groups (a seeded balanced assignment) are switched off (inverted
  dropout: the kept ones are scaled up so the expected write is unchanged);
* adaptive weighting: each auxiliary term ``L_i`` enters the loss as ``base_i · log(ε + L_i)`` (ε = 1e-4), i.e.
  with the weight ``base_i / (ε + L_i)`` at every step, so it keeps pulling with the same relative force whatever
  its scale, without state to carry across a resume.

Write directions: ``diverse`` (each added neuron's ``W_out`` row is free) or ``single`` (every ``W_out`` row is a
multiple of one refusal direction of the base model, kept there by :class:`~mechsafe.finetune.Project`): the
control that one rank-1 directional ablation removes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.hooks import hook_name, parse_layers

logger = logging.getLogger(__name__)

DIRECTIONS = ("diverse", "single")
SPEC_KEY = "mfs_embedded"
"""Key of the embedded neurons' description in the checkpoint manifest (``model.mechsafe_info.extra``)."""
_EPS = 1e-4


@dataclasses.dataclass
class EmbedConfig:
    """Settings of :func:`embed` (``mechsafe mfs embed``). The data mix and the safety / retain objectives are the
    align recipe's (:class:`mechsafe.align.AlignConfig`, defaults); the optimizer schedule is its LoRA schedule."""

    base: str = "smollm2-135m-instruct"
    """Model the neurons are added to (loaded with ``processing="none"``)."""
    n_features: int = 10_000
    """Added neurons in all, split over ``layers`` (the first ``n_features % len(layers)`` blocks get one more)."""
    layers: str = "all"
    """Blocks that get neurons (a layer selector: ``all``, ``middle``, ``10-20`` ...). Every block is widened to
    the largest share; unchosen blocks hold only zero neurons (compute without effect)."""
    directions: str = "diverse"
    """``diverse``: free write directions; ``single``: every write along one refusal direction (the control)."""
    direction_layer: int | None = None
    """``single``: the block whose input gives the difference-in-means refusal direction (harmful vs harmless TRAIN
    prompts, last prompt position); None: the middle chosen block."""
    steps: int = 140
    """Optimizer steps (8 examples each)."""
    lr: float = 1e-3
    """Peak learning rate (4 warm-up steps, linear decay)."""
    init_scale: float = 1.0
    """Read weights (``W_in``/``W_gate`` columns) start as Gaussians with this times the original columns' standard
    deviation; write rows start at zero, so the untrained model equals the base model."""
    feature_dropout: float = 0.3
    """Share of added neurons switched off at random in each training forward."""
    group_dropout: float = 0.1
    """Share of groups switched off at random in each training forward."""
    n_groups: int = 256
    """Groups of the dropout code."""
    diversity: float = 0.1
    """Base weight of the diversity term (``diverse`` only)."""
    sparsity: float = 0.01
    """Base weight of the sparsity term."""
    seed: int = 0
    """Seed of the initialization, the dropout and the example order."""

    def __post_init__(self) -> None:
        if self.directions not in DIRECTIONS:
            raise MechsafeError(f"unknown write directions {self.directions!r}; choose one of {', '.join(DIRECTIONS)}")
        for name in ("n_features", "steps", "n_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MechsafeError(f"{name}={value!r} must be a positive integer")
        for name in ("feature_dropout", "group_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise MechsafeError(f"{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("lr", "init_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise MechsafeError(f"{name}={getattr(self, name)} must be a positive number")
        if self.diversity < 0 or self.sparsity < 0:
            raise MechsafeError("diversity and sparsity must be >= 0 (0 turns the term off)")
        if not isinstance(self.layers, str):
            self.layers = ",".join(str(i) for i in self.layers) if not isinstance(self.layers, int) else str(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EmbeddedSpec:
    """Where the added neurons of an embedded model are: block ``l`` holds ``counts[l]`` of them, at MLP indices
    ``base_d_mlp … base_d_mlp + counts[l] - 1``."""

    base_d_mlp: int
    counts: list[int]
    directions: str = "diverse"
    direction: list[float] | None = None
    """``single``: the unit write direction."""

    @property
    def n_features(self) -> int:
        return sum(self.counts)

    @property
    def layers(self) -> list[int]:
        return [layer for layer, n in enumerate(self.counts) if n]

    def neurons(self) -> list[tuple[int, int]]:
        """Every added neuron as ``(layer, MLP index)``, block by block."""
        return [(layer, self.base_d_mlp + j) for layer, n in enumerate(self.counts) for j in range(n)]

    def units(self) -> dict[int, torch.Tensor]:
        """The added neurons' MLP indices by block (``{layer: indices}``, as :mod:`mechsafe.mfs.adaptive` takes)."""
        return {layer: torch.arange(self.base_d_mlp, self.base_d_mlp + self.counts[layer]) for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_counts(n_features: int, n_layers: int, layers: str) -> list[int]:
    """Added neurons per block: ``n_features`` over the chosen blocks, the first ones one more when it does not
    divide."""
    chosen = parse_layers(layers, n_layers)
    share, rest = divmod(n_features, len(chosen))
    counts = [0] * n_layers
    for i, layer in enumerate(chosen):
        counts[layer] = share + (i < rest)
    return counts


def embedded_spec(model: HookedTransformer) -> EmbeddedSpec:
    """The added neurons of an embedded model (from its checkpoint manifest, or set by :func:`widen`)."""
    extra = getattr(getattr(model, "mechsafe_info", None), "extra", None) or {}
    if SPEC_KEY not in extra:
        raise MechsafeError("this model has no embedded MFS neurons; pass a checkpoint written by `mechsafe mfs embed`")
    return EmbeddedSpec(**extra[SPEC_KEY])


def widen(model: HookedTransformer, counts: Sequence[int], generator: torch.Generator | None = None,
          init_scale: float = 1.0, directions: str = "diverse", direction: torch.Tensor | None = None
          ) -> HookedTransformer:
    """A copy of ``model`` whose MLPs are ``max(counts)`` neurons wider; block ``l``'s first ``counts[l]`` new
    neurons get Gaussian read weights (``init_scale`` times the block's original column std) and zero write rows,
    every other new weight is zero. The copy computes exactly what ``model`` computes until its write rows change."""
    from mechsafe.models import linear_layout, model_info

    if not model.cfg.d_mlp or not hasattr(model.blocks[0], "mlp"):
        raise MechsafeError(f"{model.cfg.model_name} has no MLP blocks to widen; embedded mode needs an MLP model")
    if len(counts) != model.cfg.n_layers or min(counts) < 0 or max(counts) < 1:
        raise MechsafeError(f"counts must give each of the {model.cfg.n_layers} blocks a non-negative number of neurons "
                            "(at least one in all)")
    base_d_mlp, extra = model.cfg.d_mlp, max(counts)
    gen = generator or torch.Generator().manual_seed(0)
    state = model.state_dict()
    wide = {}
    for name, value in state.items():
        parts = name.split(".")
        kind = parts[-1] if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "mlp" else None
        if kind not in ("W_in", "W_gate", "W_out", "b_in"):
            wide[name] = value
            continue
        layer, axis = int(parts[1]), 0 if kind == "W_out" or kind == "b_in" else 1
        shape = list(value.shape)
        shape[axis] = extra
        pad = torch.zeros(shape, dtype=value.dtype)
        n = counts[layer]
        if kind in ("W_in", "W_gate") and n:
            std = float(value.float().std()) * init_scale
            pad[:, :n] = torch.randn(shape[0], n, generator=gen).to(value.dtype) * std
        wide[name] = torch.cat([value.detach().cpu(), pad], dim=axis)
    cfg = copy.deepcopy(model.cfg)
    cfg.d_mlp = base_d_mlp + extra
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        out = HookedTransformer(cfg, model.tokenizer, move_to_device=False, default_padding_side="right")
    out.load_state_dict(wide, strict=True)
    out.to(model.cfg.device)
    linear_layout(out).eval()
    info = model_info(model)
    spec = EmbeddedSpec(base_d_mlp, [int(c) for c in counts], directions,
                        None if direction is None else [float(x) for x in direction])
    out.mechsafe_info = dataclasses.replace(info, extra={**info.extra, SPEC_KEY: spec.to_dict()})
    return out


def _original_mask(shape: torch.Size, base: int, axis: int) -> torch.Tensor:
    """True on the original neurons (frozen) along the neuron ``axis``, False on the added ones."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.narrow(axis, 0, base).fill_(True)
    return mask


def write_overlap(model: HookedTransformer, spec: EmbeddedSpec) -> torch.Tensor:
    """Mean over blocks of the mean squared cosine between distinct added neurons' write directions (differentiable;
    computed through the ``d_model x d_model`` Gram, so it costs ``n d_model²`` per block)."""
    terms = []
    for layer in spec.layers:
        n = spec.counts[layer]
        if n < 2:
            continue
        rows = model.blocks[layer].mlp.W_out[spec.base_d_mlp:spec.base_d_mlp + n]
        unit = rows / (rows.norm(dim=1, keepdim=True) + 1e-8)
        gram = unit.T @ unit
        diag = (unit.pow(2).sum(1)).pow(2).sum()
        terms.append(((gram.pow(2).sum() - diag) / (n * (n - 1))).clamp_min(0))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class _Training:
    """Hooks of the training forwards: dropout of added neurons and groups, and their activations for the sparsity
    term (kept only while the model is in training mode)."""

    def __init__(self, model: HookedTransformer, spec: EmbeddedSpec, config: EmbedConfig):
        from mechsafe.mfs.aggregate import group_code

        self.model, self.spec, self.config = model, spec, config
        total = spec.n_features
        groups = group_code(total, min(config.n_groups, total), 1, config.seed)[:, 0]
        self.groups, self.n_groups, self.offsets = groups, min(config.n_groups, total), np.cumsum([0] + spec.counts)
        self.captured: list[torch.Tensor] = []
        self.group_keep: torch.Tensor | None = None

    def new_forward(self) -> None:
        self.group_keep = torch.rand(self.n_groups) >= self.config.group_dropout

    def hook(self, layer: int):
        base, n = self.spec.base_d_mlp, self.spec.counts[layer]
        start = int(self.offsets[layer])

        def fn(post: torch.Tensor, hook=None) -> torch.Tensor:
            if not self.model.training:
                return post
            if layer == self.spec.layers[0]:
                self.new_forward()
            c = self.config
            keep = (torch.rand(n) >= c.feature_dropout) & self.group_keep[self.groups[start:start + n]]
            scale = keep.to(post.dtype) / ((1 - c.feature_dropout) * (1 - c.group_dropout))
            added = post[..., base:base + n] * scale.to(post.device)
            self.captured.append(added.abs().mean())
            return torch.cat([post[..., :base], added, post[..., base + n:]], dim=-1)

        return fn

    def hooks(self) -> list[tuple[str, Any]]:
        return [(hook_name(self.model, "mlp_post", layer), self.hook(layer)) for layer in self.spec.layers]


def _neuron_terms_cls():
    from mechsafe.finetune.objectives import Objective

    class NeuronTerms(Objective):
        """The MFS auxiliary terms (diversity, sparsity) with adaptive weights, on every pooled example so that each
        micro-batch adds them once."""

        name = "mfs_neurons"

        def __init__(self, examples, training: _Training, config: EmbedConfig):
            super().__init__(examples)
            self.training = training
            self.diversity = config.diversity if training.spec.directions == "diverse" else 0.0
            self.sparsity = config.sparsity

        def term(self, mb, rows):
            parts = []
            if self.sparsity and self.training.captured:
                parts.append(self.sparsity * torch.log(_EPS + torch.stack(self.training.captured).mean()))
            if self.diversity:
                parts.append(self.diversity * torch.log(_EPS + write_overlap(mb.model, self.training.spec)))
            self.training.captured.clear()
            total = sum(parts) if parts else torch.zeros((), requires_grad=True)
            return total * len(rows)

        def describe(self):
            return {"name": self.name, "diversity": self.diversity, "sparsity": self.sparsity,
                    "n_examples": len(self.examples)}

    return NeuronTerms


def refusal_write_direction(model: HookedTransformer, layer: int, seed: int = 0) -> torch.Tensor:
    """Unit difference-in-means direction (harmful minus harmless TRAIN prompts, last prompt position) at the input
    of ``layer``: the single write direction of the ``single`` control."""
    from mechsafe.data import prompt_pool
    from mechsafe.directions import difference_in_means

    harmful = [p["text"] for p in prompt_pool("harmful", "train", 64, seed)]
    harmless = [p["text"] for p in prompt_pool("harmless", "train", 64, seed)]
    d = difference_in_means(model, harmful, harmless, layer, filter_prompts=False)
    return (d / d.norm()).float().cpu()


def _seed_answers(model: HookedTransformer, work: Path) -> None:
    """Reuse the base model's cached answers from an align build of the same model when one exists (the same greedy
    answers; :func:`mechsafe.evaluation.cached_answers` checks the key and regenerates on any mismatch)."""
    from mechsafe.align.data import ANSWERS_FILE
    from mechsafe.models import cache_dir, model_info
    from mechsafe.runs import read_json, stable_hash

    target = work / ANSWERS_FILE
    if target.exists():
        return
    key = stable_hash({"model": model_info(model).to_dict()})
    for path in sorted((cache_dir() / "builds").glob(f"*/{ANSWERS_FILE}")):
        try:
            if read_json(path).get("key") == key:
                work.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                return
        except (OSError, ValueError):
            continue


@dataclasses.dataclass
class _Plan:
    """Everything one embedding run trains with: the widened model, its objectives, the trainer's config, the
    gradient transforms and the training hooks."""

    wide: HookedTransformer
    spec: EmbeddedSpec
    objectives: list
    finetune: Any
    transforms: list
    training: _Training
    mix: dict[str, Any]


def _plan(config: EmbedConfig, model: HookedTransformer, work: Path, recipe, progress: bool) -> _Plan:
    from mechsafe.align.data import training_objectives
    from mechsafe.finetune import Freeze, Project
    from mechsafe.finetune.config import FinetuneConfig
    from mechsafe.weights import select

    counts = split_counts(config.n_features, model.cfg.n_layers, config.layers)
    _seed_answers(model, work)
    objectives, mix = training_objectives(recipe, model, work, progress)
    direction = None
    if config.directions == "single":
        chosen = [layer for layer, n in enumerate(counts) if n]
        layer = config.direction_layer if config.direction_layer is not None else chosen[len(chosen) // 2]
        direction = refusal_write_direction(model, layer, config.seed)
    wide = widen(model, counts, torch.Generator().manual_seed(config.seed), config.init_scale, config.directions,
                 direction)
    spec = embedded_spec(wide)
    kinds = ("mlp.W_in", "mlp.W_gate", "mlp.W_out") if wide.cfg.gated_mlp else ("mlp.W_in", "mlp.W_out")
    layers = ",".join(str(layer) for layer in spec.layers)
    ft = FinetuneConfig(method="selected", targets=kinds, layers=layers, lr=config.lr, steps=config.steps,
                        batch_size=8, warmup_steps=4, schedule="linear", max_length=recipe.finetune.max_length,
                        checkpoint_every=10, seed=config.seed)
    freeze, project = {}, {}
    for h in select(wide, kinds, layers):
        if h.kind == "mlp.W_out" and direction is not None:
            project[h.name] = _write_projection(spec.base_d_mlp, spec.counts[h.layer], direction)
        else:
            freeze[h.name] = _original_mask(h.shape, spec.base_d_mlp, h.unit_axis)
    transforms = [Freeze(freeze)] + ([Project(project)] if project else [])
    training = _Training(wide, spec, config)
    terms = _neuron_terms_cls()(objectives[0].examples, training, config)
    return _Plan(wide, spec, objectives + [terms], ft, transforms, training, mix)


def _train(plan: _Plan, seed: int, run_dir: Path | None, progress: bool, callback=None):
    from mechsafe.finetune import finetune
    from mechsafe.interventions import hooked

    torch.manual_seed(seed)  # the dropout draws; the trainer's checkpoints carry this generator's state
    with hooked(plan.wide, plan.training.hooks()):
        return finetune(plan.wide, plan.objectives, plan.finetune, run_dir=run_dir, progress=progress,
                        grad_transform=plan.transforms, callback=callback)


def embed(config: EmbedConfig | None = None, work_dir: str | Path | None = None, model: HookedTransformer | None = None,
          recipe=None, progress: bool = True) -> tuple[HookedTransformer, dict[str, Any]]:
    """Add ``config.n_features`` neurons to the base model and train them (the rest frozen); returns the embedded
    model and a summary (losses, timings). ``work_dir`` holds the base answers and the trainer's checkpoints, so a
    killed run resumes there. ``recipe`` (an :class:`~mechsafe.align.AlignConfig`) sets the data mix and objective
    weights (default: the align recipe's)."""
    import time

    from mechsafe.align.config import AlignConfig
    from mechsafe.models import load_model

    config = config or EmbedConfig()
    recipe = recipe or AlignConfig(model=config.base)
    t0 = time.perf_counter()
    if model is None:
        model = load_model(config.base, processing="none")
    work = Path(work_dir) if work_dir is not None else None
    scratch = work or Path(tempfile.mkdtemp(prefix="mechsafe-embed-"))
    plan = _plan(config, model, scratch, recipe, progress)
    answers_s = time.perf_counter() - t0
    result = _train(plan, config.seed, None if work is None else work / "finetune", progress)
    if work is None:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {"config": config.to_dict(), "spec": plan.spec.to_dict(), "training_mix": plan.mix,
               "losses": result.losses, "terms": result.terms, "resumed_from": result.resumed_from,
               "timings_s": {"answers": round(answers_s, 1), "train": round(result.seconds, 1),
                             "total": round(time.perf_counter() - t0, 1)}}
    return plan.wide, summary


def build_flops(config: EmbedConfig, model: HookedTransformer, recipe=None) -> dict[str, float]:
    """FLOPs of building ``config`` on ``model``: ``setup`` (the objectives' reference passes, once), ``step`` (one
    training step) and ``total = setup + steps · step``, counted on a one-step run the way
    :func:`mechsafe.attacks.align_build_flops` counts the align recipe."""
    from mechsafe.align.config import AlignConfig
    from mechsafe.attacks.flops import setup_and_step_flops

    scratch = Path(tempfile.mkdtemp(prefix="mechsafe-embed-"))
    try:
        plan = _plan(dataclasses.replace(config, steps=1), model, scratch, recipe or AlignConfig(model=config.base),
                     progress=False)
        plan.finetune = dataclasses.replace(plan.finetune, callback_every=1, checkpoint_every=0)
        setup, step = setup_and_step_flops(lambda cb: _train(plan, config.seed, None, progress=False, callback=cb))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"setup": float(setup), "step": float(step), "total": float(setup + config.steps * step)}


def _write_projection(base: int, n: int, direction: torch.Tensor):
    """``W_out`` update projection of the ``single`` control: original rows never move, added rows stay multiples of
    the direction."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = direction.to(x.device, x.dtype)
        out = torch.zeros_like(x)
        rows = x[base:base + n]
        out[base:base + n] = (rows @ r).unsqueeze(1) * r
        return out

    return fn


def save_embedded(model: HookedTransformer, path: str | Path, **provenance: Any) -> Path:
    """Save an embedded model as a checkpoint :func:`mechsafe.load_model` reads (the wider MLP in its config)."""
    from mechsafe.models import save_model

    spec = embedded_spec(model)
    return save_model(model, path, **{SPEC_KEY: spec.to_dict()}, **provenance)


def added_contribution_hooks(model: HookedTransformer, embedded: HookedTransformer) -> list[tuple[str, Any]]:
    """Hooks that add the embedded model's added neurons to ``model`` (the base it was widened from): at every block
    with added neurons, ``mlp_out += act(x W_gate') ⊙ (x W_in') W_out'`` with ``x`` the block's normalized MLP input
    and the primed weights the added slices. With them, ``model`` computes what ``embedded`` computes."""
    spec = embedded_spec(embedded)
    base, store = spec.base_d_mlp, {}
    hooks = []
    for layer in spec.layers:
        mlp, n = embedded.blocks[layer].mlp, spec.counts[layer]

        def read(x, hook=None, layer=layer):
            store[layer] = x
            return x

        def write(out, hook=None, layer=layer, mlp=mlp, n=n):
            ln = model.blocks[layer].ln2
            x = store.pop(layer) * ln.w + (ln.b if hasattr(ln, "b") else 0)
            pre = x @ mlp.W_in[:, base:base + n]
            post = mlp.act_fn(x @ mlp.W_gate[:, base:base + n]) * pre if model.cfg.gated_mlp else mlp.act_fn(pre)
            return out + post @ mlp.W_out[base:base + n]

        hooks += [(f"blocks.{layer}.ln2.hook_normalized", read), (hook_name(model, "mlp_out", layer), write)]
    return hooks


def neuron_importance(model: HookedTransformer, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Each added neuron's mean absolute activation over the prompts' positions (padding excluded) times the norm of
    its write row: the size of what it writes, in :meth:`EmbeddedSpec.neurons` order."""
    from mechsafe.mfs.adaptive import unit_importance

    return unit_importance(model, embedded_spec(model).units(), prompts, batch_size)


def remove_neurons(model: HookedTransformer, indices: Sequence[int]):
    """Zero the weights of the added neurons at ``indices`` (into :meth:`EmbeddedSpec.neurons`); an undo handle."""
    from mechsafe.interventions import ablate_units

    neurons = embedded_spec(model).neurons()
    return ablate_units(model, [(neurons[i][0], "neuron", neurons[i][1]) for i in indices])


def refusal_rates(model: HookedTransformer, harmful: Sequence[str], harmless: Sequence[str], max_new_tokens: int = 24,
                  batch_size: int = 32) -> dict[str, Any]:
    """Refusal rate on ``harmful`` and over-refusal on ``harmless`` (greedy answers, phrase matcher, Wilson CIs)."""
    from mechsafe.evaluation import generate, refusal_flags
    from mechsafe.stats import proportion

    out = {}
    for name, prompts in (("refusal", harmful), ("over_refusal", harmless)):
        flags = refusal_flags(generate(model, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       progress=False))
        out[name] = proportion(np.asarray(flags, dtype=bool)).to_dict()
    return out


def removal_curve(model: HookedTransformer, harmful: Sequence[str], harmless: Sequence[str], fractions: Sequence[float],
                  mode: str = "random", importance: torch.Tensor | None = None, seed: int = 0,
                  max_new_tokens: int = 24, progress: bool = True) -> list[dict[str, Any]]:
    """Refusal and over-refusal with a share of the added neurons removed (``random``, or ``targeted``: the most
    important first by ``importance``); the model is restored after each point."""
    from tqdm.auto import tqdm

    n = embedded_spec(model).n_features
    if mode == "targeted":
        if importance is None or len(importance) != n:
            raise MechsafeError("targeted removal needs one importance per added neuron (neuron_importance)")
        order = torch.argsort(importance, descending=True).tolist()
    elif mode == "random":
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        raise MechsafeError(f"unknown removal mode {mode!r}; use random or targeted")
    points = []
    for frac in tqdm(list(fractions), desc=f"{mode} removal", disable=not progress):
        k = int(round(frac * n))
        edit = remove_neurons(model, order[:k]) if k else None
        try:
            points.append({"mode": mode, "fraction": float(frac), "removed": k,
                           **refusal_rates(model, harmful, harmless, max_new_tokens)})
        finally:
            if edit is not None:
                edit.undo()
    return points
