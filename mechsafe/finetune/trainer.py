"""The trainer: any set of a model's parameters against a list of objectives.

What trains (``FinetuneConfig.method``): LoRA adapters on selected weights, every parameter, or the
selected weights themselves. Each optimizer step draws ``batch_size * grad_accum`` of the pooled
examples of the objectives (:mod:`mechsafe.finetune.objectives`), runs each micro-batch once (every
example's response and the objectives' alternative responses, each distinct prompt once with
``share_prompts``) and backpropagates the weighted sum of the objectives' terms. Gradient transforms
(:mod:`mechsafe.finetune.transforms`) constrain the step; callbacks see the model every N steps.

Example order is a fixed function of the seed and the step (one seeded permutation per epoch,
consumed in order), so a run interrupted after a checkpoint and resumed from it reproduces the
uninterrupted run exactly: the checkpoint holds the trained parameters (LoRA factors or weights),
the AdamW state, the step, the losses so far and the RNG state.

Run-directory layout (when ``run_dir`` is given)::

    run_dir/run.json                       config, objectives, versions, seed, weight processing, timings
    run_dir/losses.json                    loss per optimizer step, and each objective's mean term
    run_dir/checkpoints/step-000050/       trained.safetensors, optimizer.pt, rng.pt, state.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.errors import MechsafeError
from mechsafe.finetune.config import FinetuneConfig
from mechsafe.finetune.lora import attach_lora, merge_lora, remove_lora
from mechsafe.finetune.objectives import MicroBatch, Objective, ReferencePass, ResponseNLL
from mechsafe.finetune.transforms import GradTransform
from mechsafe.forward import TeacherForced, collate, encode_examples, final_resid, masked_nll, shared_prompt_resid
from mechsafe.models import model_info
from mechsafe.runs import atomic_dir, read_json, stable_hash, write_json, write_run_manifest
from mechsafe.weights import select

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_KEEP_CHECKPOINTS = 2
_RESUME_IRRELEVANT = ("checkpoint_every", "callback_every", "merge")

Callback = Callable[[int, HookedTransformer], Any]


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    model: HookedTransformer
    """The fine-tuned model (the same object that was passed in): merged, or still carrying LoRA adapters."""
    losses: list[float]
    """The loss of every optimizer step (the weighted sum of the objectives' mean terms), resumed steps included."""
    terms: dict[str, list[float | None]]
    """Each objective's mean term per step, by objective name (``None`` for a step without its examples)."""
    config: FinetuneConfig
    """The configuration used."""
    steps: int
    """Optimizer steps taken in total."""
    merged: bool
    """Whether LoRA adapters were merged into the weights (always True for ``full`` and ``selected``)."""
    resumed_from: int
    """The checkpoint step this call resumed from (0: a fresh start)."""
    seconds: float
    """Wall time of this call."""
    run_dir: Path | None = None
    """Where checkpoints and losses were written, if anywhere."""
    lora: Any = None
    """PEFT's ``LoraModel`` when the adapters were not merged (``config.merge=False``), else ``None``."""

    def merge(self) -> HookedTransformer:
        """Merge the adapters now (when ``config.merge`` was False) and return the plain model."""
        if not self.merged:
            self.model = merge_lora(self.lora)
            self.lora, self.merged = None, True
        return self.model

    def to_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "terms": self.terms, "config": self.config.to_dict(), "steps": self.steps,
                "merged": self.merged, "resumed_from": self.resumed_from, "seconds": round(self.seconds, 3),
                "run_dir": str(self.run_dir) if self.run_dir else None}

    @classmethod
    def load(cls, run_dir: str | Path, model: HookedTransformer | None = None) -> "FinetuneResult":
        """A finished run back from its directory (``run.json`` and ``losses.json``); the trained weights are not
        part of it: pass the model saved from it (``mechsafe.load_model``) as ``model`` if needed."""
        run_dir = Path(run_dir)
        manifest, losses = read_json(run_dir / "run.json"), read_json(run_dir / "losses.json")
        if manifest.get("command") != "finetune":
            raise MechsafeError(f"{run_dir} is not a finished fine-tuning run (no finetune run.json); check the path")
        return cls(model=model, losses=losses["losses"], terms=losses["terms"], config=FinetuneConfig(**manifest["config"]),
                   steps=manifest["steps"], merged=manifest["merged"], resumed_from=manifest["resumed_from"],
                   seconds=manifest["timings_s"]["finetune"], run_dir=run_dir)


def example_order(step: int, config: FinetuneConfig, n: int) -> list[list[int]]:
    """Pooled-example indices of each micro-batch of optimizer step ``step`` (0-based).

    The examples form an endless stream of seeded permutations (one per epoch); step ``s`` takes
    the next ``grad_accum * batch_size`` of them.
    """
    per_step = config.batch_size * config.grad_accum
    start = step * per_step
    flat: list[int] = []
    epoch = start // n
    offset = start - epoch * n
    while len(flat) < per_step:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        flat += perm[offset:]
        offset, epoch = 0, epoch + 1
    flat = flat[:per_step]
    return [flat[i:i + config.batch_size] for i in range(0, per_step, config.batch_size)]


def _check_objectives(objectives: Objective | Sequence[Objective]) -> list[Objective]:
    objectives = [objectives] if isinstance(objectives, Objective) else list(objectives or [])
    if not objectives:
        raise MechsafeError("nothing to train on; pass at least one objective, e.g. ResponseNLL(examples)")
    for obj in objectives:
        if not isinstance(obj, Objective):
            raise MechsafeError(f"{obj!r} is not an objective; wrap (prompt, response) pairs in ResponseNLL(...)")
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise MechsafeError(f"objectives {names} repeat a kind; give each kind one objective with all its examples")
    return objectives


def _pool(objectives: list[Objective], tokenizer, config: FinetuneConfig, system: str | None) -> list[TeacherForced]:
    """Pool the objectives' examples (an example named by several objectives is one pooled example; a repeated
    example within one objective stays repeated), bind each objective to its pooled examples, return their sequences."""
    pooled: list[tuple] = []
    where: dict[tuple, list[int]] = {}
    units: list[list[int]] = []
    for obj in objectives:
        used: dict[tuple, int] = {}
        units.append([])
        for ex in obj.examples:
            k = used.get(ex, 0)
            copies = where.setdefault(ex, [])
            if k == len(copies):
                copies.append(len(pooled))
                pooled.append(ex)
            units[-1].append(copies[k])
            used[ex] = k + 1
    seqs = encode_examples(tokenizer, pooled, max_length=config.max_length, system=system)
    for obj, own in zip(objectives, units):
        alts = []
        if obj.alternatives is not None:
            alts = encode_examples(tokenizer, [(ex[0], text, False, ex[3]) for ex, text in zip(obj.examples, obj.alternatives)],
                                   max_length=config.max_length, system=system)
        obj.bind(own, [seqs[u] for u in own], alts)
    return seqs


def _alternative_rows(mb: list[int], objectives: list[Objective]) -> list[TeacherForced]:
    """The alternative rows of the micro-batch's examples (per example, in objective order; equal rows once)."""
    rows: dict[tuple[int, ...], TeacherForced] = {}
    for u in mb:
        for obj in objectives:
            for _, item in obj.rows([u]):
                seq = obj.alternative(item)
                if seq is not None:
                    rows.setdefault(tuple(seq.ids), seq)
    return list(rows.values())


def _forward(model: HookedTransformer, rows: list[TeacherForced], alt_rows: list[TeacherForced], pad: int,
             share_prompts: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Summed response NLL of each row and of each alternative row, and the rows' final residuals."""
    n = len(rows)
    if share_prompts:  # every prompt once, all continuations in one pass
        tokens, mask, resid = shared_prompt_resid(model, rows + alt_rows, pad)
        nll = masked_nll(model, tokens, mask, resid=resid)
        return nll[:n], nll[n:], resid[:n]
    tokens, mask = collate(rows, pad)
    resid = final_resid(model, tokens)
    alt_nll = masked_nll(model, *collate(alt_rows, pad)) if alt_rows else None
    return masked_nll(model, tokens, mask, resid=resid), alt_nll, resid


def _autocast(model: HookedTransformer, config: FinetuneConfig):
    """The forward passes' precision context: bfloat16 autocast for ``precision="bfloat16"``, else none."""
    if config.precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(model.cfg.device).type, dtype=torch.bfloat16)


def _step(model: HookedTransformer, seqs: list[TeacherForced], micro: list[list[int]], pad: int,
          objectives: list[Objective], config: FinetuneConfig) -> tuple[float, dict[str, float | None]]:
    """Forward/backward of one optimizer step: gradients of the sum over objectives of weight times the
    objective's mean term over the step. Returns that loss and each objective's mean (``None`` when the step
    holds none of its examples)."""
    flat = [u for mb in micro for u in mb]
    counts = {o.name: o.count(flat) for o in objectives}
    totals = dict.fromkeys(counts, 0.0)
    for mb in micro:
        alt_rows = _alternative_rows(mb, objectives)
        with _autocast(model, config):
            row_nll, alt_nll, resid = _forward(model, [seqs[u] for u in mb], alt_rows, pad, config.share_prompts)
            batch = MicroBatch(model=model, units=mb, nll=row_nll, resid=resid,
                               alt_nll={tuple(s.ids): alt_nll[r] for r, s in enumerate(alt_rows)})
            loss = None
            for obj in objectives:
                rows = obj.rows(mb)
                if not rows:
                    continue
                term = obj.term(batch, rows)
                scaled = obj.weight * term / counts[obj.name]
                loss = scaled if loss is None else loss + scaled
                totals[obj.name] += float(term.detach())
        if loss is not None:
            loss.backward()
    means = {name: totals[name] / counts[name] if counts[name] else None for name in counts}
    total = sum(o.weight * means[o.name] for o in objectives if means[o.name] is not None)
    return total, means


def _trained_parameters(model: HookedTransformer, config: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    """Mark the parameters ``config`` trains as the only ones requiring gradients; return them by name."""
    if config.method == "full":
        chosen = dict(model.named_parameters())
    else:
        chosen = {h.name: h.parameter for h in select(model, config.targets, config.layers)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return chosen


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def _save_checkpoint(run_dir: Path, step: int, total: int, losses: list[float], terms: dict[str, list[float | None]],
                     fingerprint: str, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> Path:
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous() for k, v in params.items()}, str(tmp / "trained.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "total_steps": total, "losses": losses, "terms": terms,
                                        "fingerprint": fingerprint})
    for old in _checkpoint_dirs(run_dir)[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    write_json(run_dir / "losses.json", {"step": step, "losses": losses, "terms": terms})
    return final


def _load_checkpoint(ckpt: Path, fingerprint: str, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer) -> tuple[int, list[float], dict[str, list[float | None]]]:
    from safetensors.torch import load_file

    state = read_json(ckpt / "state.json")
    if state.get("fingerprint") != fingerprint:
        raise MechsafeError(f"{ckpt} was written with another config or other objectives; "
                            "use a new run dir or pass resume=False (--no-resume) to start over")
    try:
        saved = load_file(str(ckpt / "trained.safetensors"))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise MechsafeError(f"{ckpt / 'trained.safetensors'} is corrupt ({exc}); delete {ckpt} to resume from the "
                            "checkpoint before it") from None
    if set(saved) != set(params):
        raise MechsafeError(f"{ckpt} holds other parameters than this run trains; use a new run dir")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True)["torch"])
    terms = {k: [None if x is None else float(x) for x in v] for k, v in state["terms"].items()}
    return int(state["step"]), [float(x) for x in state["losses"]], terms


def _apply_transforms(transforms: list[GradTransform], params: dict[str, torch.nn.Parameter]) -> None:
    for name, p in params.items():
        for t in transforms:
            if name in t.names and p.grad is not None:  # in place: the buffer keeps the layout the optimizer expects
                p.grad.copy_(t.grad(name, p.grad))


def finetune(model: HookedTransformer, objectives: Objective | Sequence[Objective],
             config: FinetuneConfig | None = None, run_dir: str | Path | None = None, resume: bool = True,
             progress: bool = True, callback: Callback | None = None, system: str | None = None,
             grad_transform: GradTransform | Sequence[GradTransform] | None = None) -> FinetuneResult:
    """Train ``model`` (in place) against ``objectives``.

    Args:
        model: a ``HookedTransformer`` with a tokenizer (load weight-space models with ``processing="none"``).
        objectives: one or more :class:`~mechsafe.finetune.objectives.Objective` (e.g. ``ResponseNLL(pairs)``);
            a list of (prompt, response) pairs is taken as ``ResponseNLL(pairs)``.
        config: what trains and how (defaults: :class:`FinetuneConfig`).
        run_dir: folder for checkpoints, losses and ``run.json``; ``None`` keeps everything in memory.
        resume: continue from the latest checkpoint in ``run_dir`` (which must come from the same config and data).
        progress: show a tqdm progress bar.
        callback: ``callback(step, model)`` after every ``config.callback_every`` steps, before the first
            step of a fresh run (step 0) and after the last. Under LoRA the model still carries its adapters (read
            adapted weights with :func:`mechsafe.finetune.adapted_weight`); an exception (from the callback or an
            interrupt) removes them again, and with ``full``/``selected`` leaves the weights as the last step left
            them; resume from the last checkpoint.
        system: optional system prompt of the chat template.
        grad_transform: constraints applied at every step (:class:`~mechsafe.finetune.transforms.Freeze`,
            :class:`~mechsafe.finetune.transforms.Project`), keyed by the trained parameters' names.
    """
    config = config or FinetuneConfig()
    if isinstance(objectives, (list, tuple)) and objectives and all(isinstance(e, (list, tuple)) for e in objectives):
        objectives = [ResponseNLL(objectives)]
    objectives = _check_objectives(objectives)
    transforms = [grad_transform] if isinstance(grad_transform, GradTransform) else list(grad_transform or [])
    if model.tokenizer is None:
        raise MechsafeError("the model has no tokenizer; load it with mechsafe.load_model")
    t0 = time.perf_counter()
    seqs = _pool(objectives, model.tokenizer, config, system)
    longest = max(len(s) for o in objectives for s in o.seqs + o.alt_seqs)
    if longest > model.cfg.n_ctx:
        raise MechsafeError(f"a sequence is longer than the model's context ({model.cfg.n_ctx}); lower max_length")
    total = config.total_steps(len(seqs))
    relevant = {k: v for k, v in config.to_dict().items() if k not in _RESUME_IRRELEVANT}
    fingerprint = stable_hash({"config": relevant, "system": system,
                               "objectives": [o.describe() for o in objectives]}, 20)
    run_dir = Path(run_dir) if run_dir is not None else None

    ref = ReferencePass(share_prompts=config.share_prompts,
                        wanted=[row for o in objectives for row in o.reference_rows()])
    for obj in objectives:  # the model is still the one before training
        obj.prepare(model, ref)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    tuner = None

    def restore() -> None:  # leave the model as it came in (with full/selected: its current weights)
        if tuner is not None:
            remove_lora(tuner)
        _restore_requires_grad(model, requires_grad)

    try:
        if config.method == "lora":
            tuner = attach_lora(model, config)
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        else:
            params = _trained_parameters(model, config)
        for t in transforms:
            t.check(params)
        # one fused kernel over every trained tensor (~10x faster on CPU when every weight trains); LoRA's few
        # factors keep the default implementation
        fused = config.method != "lora" and all(p.device.type in ("cpu", "cuda") for p in params.values())
        optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay,
                                      fused=fused or None)
        step, losses, terms = 0, [], {o.name: [] for o in objectives}
        if run_dir is not None and resume and _checkpoint_dirs(run_dir):
            step, losses, terms = _load_checkpoint(_checkpoint_dirs(run_dir)[-1], fingerprint, params, optimizer)
            logger.info("resumed from step %d of %d in %s", step, total, run_dir)
            if step > total:
                raise MechsafeError(f"{run_dir} holds a checkpoint past the last step ({step} > {total}); "
                                    "use a new run dir")
    except BaseException:
        restore()
        raise
    stepped = {name: p for name, p in params.items() if any(name in t.names for t in transforms)}
    resumed_from = step
    pad = chat.pad_id(model.tokenizer)
    was_training = model.training
    model.train()
    if callback is not None and step == 0:
        callback(0, model)
    bar = tqdm(total=total, initial=step, desc=config.method, unit="step", disable=not progress)
    try:
        while step < total:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, total)
            optimizer.zero_grad(set_to_none=True)
            loss, means = _step(model, seqs, example_order(step, config, len(seqs)), pad, objectives, config)
            _apply_transforms(transforms, params)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            before = {name: p.detach().clone() for name, p in stepped.items()}
            optimizer.step()
            with torch.no_grad():
                for name, p in stepped.items():
                    new = p.detach()
                    for t in transforms:
                        if name in t.names:
                            new = t.step(name, before[name], new)
                    p.copy_(new)
            step += 1
            losses.append(loss)
            for name, value in means.items():
                terms[name].append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.4f}" for k, v in means.items() if v is not None})
            if run_dir is not None and (step == total or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                _save_checkpoint(run_dir, step, total, losses, terms, fingerprint, params, optimizer)
            if callback is not None and (step % config.callback_every == 0 or step == total):
                callback(step, model)
    except BaseException:
        bar.close()
        model.train(was_training)
        restore()  # the checkpoints keep the progress
        raise
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    merged = tuner is None or config.merge
    if tuner is not None and config.merge:
        merge_lora(tuner)
        tuner = None
    if tuner is None:
        _restore_requires_grad(model, requires_grad)
    seconds = time.perf_counter() - t0
    result = FinetuneResult(model=model, losses=losses, terms=terms, config=config, steps=step, merged=merged,
                            resumed_from=resumed_from, seconds=seconds, run_dir=run_dir, lora=tuner)
    if run_dir is not None:
        write_json(run_dir / "losses.json", {"step": step, "losses": losses, "terms": terms})
        write_run_manifest(run_dir, command="finetune", config=config.to_dict(), seed=config.seed,
                           processing=model_info(model).processing, timings={"finetune": round(seconds, 3)},
                           extra={"model": model_info(model).to_dict(), "fingerprint": fingerprint,
                                  "objectives": [{"name": o.name, "weight": o.weight, "n_examples": len(o.examples)}
                                                 for o in objectives],
                                  "n_pooled_examples": len(seqs), "grad_transforms": [type(t).__name__ for t in transforms],
                                  "resumed_from": resumed_from, "steps": step, "merged": merged,
                                  "final_loss": losses[-1] if losses else None})
    return result


def _restore_requires_grad(model: HookedTransformer, flags: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
