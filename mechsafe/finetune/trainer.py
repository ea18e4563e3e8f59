"""The LoRA training loop: response-only loss, resumable checkpoints, callbacks, merge.

Example order is a fixed function of the seed and the step (one seeded permutation per epoch,
consumed in order), so a run interrupted after a checkpoint and resumed from it reproduces the
uninterrupted run exactly: the checkpoint holds the LoRA factors, the AdamW state, the step, the
losses so far and the RNG state.

Run-directory layout (when ``run_dir`` is given)::

    run_dir/run.json                       config, versions, seed, weight processing, timings
    run_dir/losses.json                    loss per optimizer step (and the retain KL, unlikelihood and preference, when on)
    run_dir/checkpoints/step-000050/       adapter.safetensors, optimizer.pt, rng.pt, state.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechsafe import chat
from mechsafe.errors import MechsafeError
from mechsafe.finetune.config import FinetuneConfig
from mechsafe.finetune.lora import attach_lora, load_lora_state, lora_state, merge_lora, remove_lora
from mechsafe.finetune.preference import Pair, dpo_loss, reference_pairs
from mechsafe.finetune.retain import Reference, reference_topk, retain_kl_sum
from mechsafe.finetune.sequences import (TeacherForced, check_examples, collate, encode_examples, final_resid, masked_nll,
                                         shared_prompt_resid, unlikelihood)
from mechsafe.models import model_info
from mechsafe.runs import atomic_dir, read_json, stable_hash, write_json, write_run_manifest

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_KEEP_CHECKPOINTS = 2
_RESUME_IRRELEVANT = ("checkpoint_every", "callback_every", "merge")
TERMS = ("retain_kl", "unlikelihood", "preference")
"""Extra loss terms whose per-step means are recorded (when the term is on)."""

Callback = Callable[[int, HookedTransformer], Any]


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    model: HookedTransformer
    """The fine-tuned model (the same object that was passed in): merged, or still carrying the adapters."""
    losses: list[float]
    """Training loss (mean response NLL per token) of every optimizer step, resumed steps included."""
    config: FinetuneConfig
    """The configuration used."""
    steps: int
    """Optimizer steps taken in total."""
    merged: bool
    """Whether the adapters were merged into the weights."""
    resumed_from: int
    """The checkpoint step this call resumed from (0: a fresh start)."""
    seconds: float
    """Wall time of this call."""
    run_dir: Path | None = None
    """Where checkpoints and losses were written, if anywhere."""
    lora: Any = None
    """PEFT's ``LoraModel`` while the adapters are not merged (``None`` after merging)."""
    retain_kl: list[float | None] = dataclasses.field(default_factory=list)
    """Mean retain-term KL per retained position of every optimizer step (``None`` for a step without a
    retained example; empty when ``kl_weight`` is 0)."""
    unlikelihood: list[float | None] = dataclasses.field(default_factory=list)
    """Mean unlikelihood per negative of every optimizer step (``None`` for a step without one; empty when
    ``unlikelihood_weight`` is 0)."""
    preference: list[float | None] = dataclasses.field(default_factory=list)
    """Mean preference-term loss per pair of every optimizer step (``log 2`` at the start; ``None`` for a step
    without a pair; empty when ``preference_weight`` is 0)."""

    def merge(self) -> HookedTransformer:
        """Merge the adapters now (when ``config.merge`` was False) and return the plain model."""
        if not self.merged:
            self.model = merge_lora(self.lora)
            self.lora, self.merged = None, True
        return self.model

    def to_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "retain_kl": self.retain_kl, "unlikelihood": self.unlikelihood,
                "preference": self.preference,
                "config": self.config.to_dict(), "steps": self.steps, "merged": self.merged,
                "resumed_from": self.resumed_from, "seconds": round(self.seconds, 3),
                "run_dir": str(self.run_dir) if self.run_dir else None}


def _fingerprint(config: FinetuneConfig, examples: Sequence[tuple], system: str | None, retain: list[int],
                 negatives: dict[int, str], rejected: dict[int, str]) -> str:
    relevant = {k: v for k, v in config.to_dict().items() if k not in _RESUME_IRRELEVANT}
    if relevant["precision"] == "float32":  # (absent by default, so checkpoints written before it existed still resume)
        del relevant["precision"]
    # (an example without a prefix is listed as before prefixes existed, so older checkpoints still resume)
    data = {"config": relevant, "examples": [list(e if e[3] else e[:3]) for e in examples], "system": system,
            "retain": retain, "negatives": sorted(negatives.items())}
    if rejected:  # (absent when off, so checkpoints written before the term existed still resume)
        data["rejected"] = sorted(rejected.items())
    return stable_hash(data, 20)


def _check_term(name: str, indices: list[int], n: int, weight_name: str, weight: float, what: str) -> None:
    """Errors (naming the fix) for the examples of an extra loss term and its weight."""
    if indices and not 0 <= min(indices) <= max(indices) < n:
        raise MechsafeError(f"{name} holds indices outside the {n} examples; pass indices in 0..{n - 1}")
    if weight > 0 and not indices:
        raise MechsafeError(f"{weight_name}={weight} needs {what}; pass {name}=... or set {weight_name}=0")
    if indices and weight == 0:
        raise MechsafeError(f"{name}=... was given but {weight_name}=0 turns its term off; "
                            f"set FinetuneConfig({weight_name}=...) or drop {name}")


def _check_retain(retain: Sequence[int] | None, n: int, config: FinetuneConfig) -> list[int]:
    """The retained example indices, sorted; errors name the fix."""
    retain = sorted({int(i) for i in retain}) if retain is not None else []
    _check_term("retain", retain, n, "kl_weight", config.kl_weight, "examples to retain")
    return retain


def _check_responses(name: str, responses: Mapping[int, str] | None, n: int, weight_name: str,
                     weight: float, what: str) -> dict[int, str]:
    """Responses of an extra loss term (``negatives``, ``rejected``) by example index; errors name the fix."""
    responses = {int(i): text for i, text in (responses or {}).items()}
    _check_term(name, list(responses), n, weight_name, weight, what)
    if not all(isinstance(t, str) and t.strip() for t in responses.values()):
        raise MechsafeError(f"{name} must map example indices to non-empty response texts; fix the data")
    return responses


def _encode_responses(model: HookedTransformer, examples: list[tuple], responses: dict[int, str],
                      config: FinetuneConfig, system: str | None) -> dict[int, TeacherForced]:
    """Each response after its example's prompt (and prefix), tokenized for teacher forcing (no end of turn appended)."""
    if not responses:
        return {}
    pairs = [(examples[i][0], text, False, examples[i][3]) for i, text in responses.items()]
    return dict(zip(responses, encode_examples(model.tokenizer, pairs, max_length=config.max_length, system=system)))


def example_order(step: int, config: FinetuneConfig, n: int) -> list[list[int]]:
    """Example indices of each micro-batch of optimizer step ``step`` (0-based).

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


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def _save_checkpoint(run_dir: Path, step: int, total: int, losses: list[float], terms: dict[str, list[float | None]],
                     fingerprint: str, model: HookedTransformer, optimizer: torch.optim.Optimizer) -> Path:
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in lora_state(model).items()}, str(tmp / "adapter.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "total_steps": total, "losses": losses, **terms,
                                        "fingerprint": fingerprint})
    for old in _checkpoint_dirs(run_dir)[:-_KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    write_json(run_dir / "losses.json", {"step": step, "losses": losses, **terms})
    return final


def _load_checkpoint(ckpt: Path, fingerprint: str, model: HookedTransformer,
                     optimizer: torch.optim.Optimizer) -> tuple[int, list[float], dict[str, list[float | None]]]:
    from safetensors.torch import load_file

    state = read_json(ckpt / "state.json")
    if state.get("fingerprint") != fingerprint:
        raise MechsafeError(f"{ckpt} was written with another config or other examples; "
                            "use a new run dir or pass resume=False (--no-resume) to start over")
    load_lora_state(model, load_file(str(ckpt / "adapter.safetensors")))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True)["torch"])
    terms = {name: [None if x is None else float(x) for x in state.get(name, [])] for name in TERMS}
    return int(state["step"]), [float(x) for x in state["losses"]], terms


def _alternative_rows(mb: list[int], negs: dict[int, TeacherForced], pairs: dict[int, Pair]
                      ) -> tuple[list[TeacherForced], dict[tuple[str, int], int]]:
    """The negatives (key ``("neg", i)``) and rejected responses (``("rej", i)``) of the micro-batch's
    examples as rows, and the row of each key; a rejected response equal to the negative shares its row."""
    rows: list[TeacherForced] = []
    row_of: dict[tuple[int, ...], int] = {}
    where: dict[tuple[str, int], int] = {}
    for i in mb:
        for kind, seq in (("neg", negs.get(i)), ("rej", pairs[i].rejected if i in pairs else None)):
            if seq is None:
                continue
            key = tuple(seq.ids)
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append(seq)
            where[(kind, i)] = row_of[key]
    return rows, where


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
          refs: dict[int, Reference], negs: dict[int, TeacherForced], pairs: dict[int, Pair],
          config: FinetuneConfig) -> tuple[float, dict[str, float | None]]:
    """Forward/backward of one optimizer step: gradients of the token-weighted mean response NLL, plus
    ``kl_weight`` times the mean retain KL over the retained positions of the step, plus
    ``unlikelihood_weight`` times the mean unlikelihood of the step's negatives, plus
    ``preference_weight`` times the mean DPO loss of the step's preference pairs. Returns the mean NLL
    and the mean of each term (``None`` when the step holds no example of it)."""
    n_tokens = sum(len(seqs[i]) - seqs[i].prompt_len for mb in micro for i in mb)
    counts = {"retain_kl": sum(refs[i].logp.shape[0] for mb in micro for i in mb if i in refs),
              "unlikelihood": sum(i in negs for mb in micro for i in mb),
              "preference": sum(i in pairs for mb in micro for i in mb)}
    nll_total, totals = 0.0, dict.fromkeys(TERMS, 0.0)
    for mb in micro:
        alt_rows, where = _alternative_rows(mb, negs, pairs)
        with _autocast(model, config):
            row_nll, alt_nll, resid = _forward(model, [seqs[i] for i in mb], alt_rows, pad, config.share_prompts)
            alt = {key: alt_nll[row] for key, row in where.items()}
            nll_sum = row_nll.sum()
            loss = nll_sum / n_tokens
            rows = [r for r, i in enumerate(mb) if i in refs]
            if rows:
                kl_sum = retain_kl_sum(model, resid, rows, [refs[mb[r]] for r in rows])
                loss = loss + config.kl_weight * kl_sum / counts["retain_kl"]
                totals["retain_kl"] += float(kl_sum.detach())
            negative = [i for i in mb if i in negs]
            if negative:  # the opening of a response the model should not give, after the same prompt
                ul_sum = unlikelihood(torch.stack([alt[("neg", i)] for i in negative])).sum()
                loss = loss + config.unlikelihood_weight * ul_sum / counts["unlikelihood"]
                totals["unlikelihood"] += float(ul_sum.detach())
            preferred = [r for r, i in enumerate(mb) if i in pairs]
            if preferred:  # the example's own response over its rejected one, relative to the starting model
                rejected_nll = torch.stack([alt[("rej", mb[r])] for r in preferred])
                pref_sum = dpo_loss(row_nll[preferred], rejected_nll, [pairs[mb[r]] for r in preferred],
                                    config.preference_beta).sum()
                loss = loss + config.preference_weight * pref_sum / counts["preference"]
                totals["preference"] += float(pref_sum.detach())
        loss.backward()
        nll_total += float(nll_sum.detach())
    return nll_total / n_tokens, {k: totals[k] / counts[k] if counts[k] else None for k in TERMS}


def finetune(model: HookedTransformer, examples: Sequence[tuple], config: FinetuneConfig | None = None,
             run_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
             callback: Callback | None = None, system: str | None = None,
             retain: Sequence[int] | None = None, negatives: Mapping[int, str] | None = None,
             rejected: Mapping[int, str] | None = None) -> FinetuneResult:
    """LoRA fine-tune ``model`` (in place) on (prompt, response) pairs; loss on response tokens only.

    Args:
        model: a ``HookedTransformer`` with a tokenizer (load weight-space models with ``processing="none"``).
        examples: (prompt, response) pairs; prompts are chat-formatted, responses end with the end-of-turn
            token (a third element ``False`` leaves it off, for responses cut short; a fourth is a prefix that
            opens the response unscored, see :func:`~mechsafe.finetune.sequences.check_examples`).
        config: LoRA and optimization settings (defaults: :class:`FinetuneConfig`).
        run_dir: folder for checkpoints, losses and ``run.json``; ``None`` keeps everything in memory.
        resume: continue from the latest checkpoint in ``run_dir`` (which must come from the same config and data).
        progress: show a tqdm progress bar.
        callback: ``callback(step, model)`` after every ``config.callback_every`` steps, before the first
            step of a fresh run (step 0) and after the last; the model still carries its adapters, read
            adapted weights with :func:`mechsafe.finetune.adapted_weight`. An exception (from the
            callback or an interrupt) removes the adapters again; resume from the last checkpoint.
        system: optional system prompt of the chat template.
        retain: indices of examples whose next-token distributions (at every position) are held near
            those of the model before training by the retain term (``config.kl_weight``, see
            :mod:`mechsafe.finetune.retain`); they are trained on their responses as usual too.
        negatives: ``{example index: response}``: a response (typically the opening of one) that should
            not follow that example's prompt; with ``config.unlikelihood_weight`` the loss gains the mean
            :func:`~mechsafe.finetune.sequences.unlikelihood` of these responses (no end of turn is appended).
        rejected: ``{example index: response}``: a response the example's own response should be preferred
            to; with ``config.preference_weight`` the loss gains the mean DPO loss of these pairs against the
            model before training (:mod:`mechsafe.finetune.preference`; no end of turn is appended).
    """
    config = config or FinetuneConfig()
    examples = check_examples(examples)
    if model.tokenizer is None:
        raise MechsafeError("the model has no tokenizer; load it with mechsafe.load_model")
    t0 = time.perf_counter()
    seqs = encode_examples(model.tokenizer, examples, max_length=config.max_length, system=system)
    if max(len(s) for s in seqs) > model.cfg.n_ctx:
        raise MechsafeError(f"a sequence is longer than the model's context ({model.cfg.n_ctx}); lower max_length")
    total = config.total_steps(len(seqs))
    retain = _check_retain(retain, len(seqs), config)
    negatives = _check_responses("negatives", negatives, len(seqs), "unlikelihood_weight", config.unlikelihood_weight,
                                 "negative responses")
    rejected = _check_responses("rejected", rejected, len(seqs), "preference_weight", config.preference_weight,
                                "rejected responses")
    fingerprint = _fingerprint(config, examples, system, retain, negatives, rejected)
    run_dir = Path(run_dir) if run_dir is not None else None
    negs, rejs = (_encode_responses(model, examples, responses, config, system) for responses in (negatives, rejected))
    refs: dict[int, Reference] = {}
    if retain:  # the model is still the one before training; with shared prompts it scores their rejected responses too
        alternatives = [rejs.get(i) for i in retain] if config.share_prompts else None
        refs = dict(zip(retain, reference_topk(model, [seqs[i] for i in retain], config.kl_top_k,
                                               alternatives=alternatives)))
    pairs = reference_pairs(model, seqs, rejs, {i: r.response_nll for i, r in refs.items()},
                            {i: r.alternative_nll for i, r in refs.items() if r.alternative_nll is not None},
                            share_prompts=config.share_prompts) if rejs else {}
    enabled = {"retain_kl": bool(refs), "unlikelihood": bool(negs), "preference": bool(pairs)}

    tuner = attach_lora(model, config)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, losses, terms = 0, [], {name: [] for name in TERMS}
    if run_dir is not None and resume and _checkpoint_dirs(run_dir):
        step, losses, terms = _load_checkpoint(_checkpoint_dirs(run_dir)[-1], fingerprint, model, optimizer)
        logger.info("resumed from step %d of %d in %s", step, total, run_dir)
        if step > total:
            raise MechsafeError(f"{run_dir} holds a checkpoint past the last step ({step} > {total}); use a new run dir")
    resumed_from = step
    pad = chat.pad_id(model.tokenizer)
    was_training = model.training
    model.train()
    if callback is not None and step == 0:
        callback(0, model)
    bar = tqdm(total=total, initial=step, desc="lora", unit="step", disable=not progress)
    try:
        while step < total:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step, total)
            optimizer.zero_grad(set_to_none=True)
            loss, means = _step(model, seqs, example_order(step, config, len(seqs)), pad, refs, negs, pairs, config)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            step += 1
            losses.append(loss)
            for name in TERMS:
                if enabled[name]:
                    terms[name].append(means[name])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.4f}" for k, v in means.items() if v is not None})
            if run_dir is not None and (step == total or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                _save_checkpoint(run_dir, step, total, losses, terms, fingerprint, model, optimizer)
            if callback is not None and (step % config.callback_every == 0 or step == total):
                callback(step, model)
    except BaseException:
        bar.close()
        model.train(was_training)
        remove_lora(tuner)  # leave the model as it came in; the checkpoints keep the progress
        raise
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    merged = config.merge
    if merged:
        merge_lora(tuner)
        tuner = None
    seconds = time.perf_counter() - t0
    result = FinetuneResult(model=model, losses=losses, config=config, steps=step, merged=merged,
                            resumed_from=resumed_from, seconds=seconds, run_dir=run_dir, lora=tuner, **terms)
    if run_dir is not None:
        write_json(run_dir / "losses.json", {"step": step, "losses": losses, **terms})
        write_run_manifest(run_dir, command="finetune", config=config.to_dict(), seed=config.seed,
                           processing=model_info(model).processing, timings={"finetune": round(seconds, 3)},
                           extra={"model": model_info(model).to_dict(), "n_examples": len(examples),
                                  "n_retain": len(retain), "n_negatives": len(negs), "n_rejected": len(pairs),
                                  "fingerprint": fingerprint,
                                  "resumed_from": resumed_from, "steps": step,
                                  "final_loss": losses[-1] if losses else None})
    return result
