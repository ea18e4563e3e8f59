"""The drift study: benign and harmful fine-tunes with every unit's drift recorded, and the freezing experiment.

* **drift runs** (:func:`drift_run`): fine-tune on benign utility pairs or on the attack bench's harmful pairs
  (same steps and learning rate, one run per seed); every ``every`` steps record each neuron's and head's drift
  terms (:func:`mechsafe.drift.track.unit_terms`), the refusal share and score of held-out harmful prompts and the
  reference-answer NLL (:class:`mechsafe.attacks.FastEval`). Each record is a safetensors file; a killed run resumes
  at its last trainer checkpoint.
* **freezing runs** (:func:`freeze_run`): the harmful fine-tune, full-parameter, with a group of MLP neurons frozen
  exactly (a :class:`~mechsafe.finetune.Freeze` gradient mask; checked bit-identical at the end), for SNIP top-safety
  and set-difference groups at matched sizes and random groups of the same size per block, plus no freezing; refusal
  share against step. A finished run is a JSON file; the study resumes at the next run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from mechsafe.attacks.bench import restore_weights
from mechsafe.attacks.data import benign_pairs, check_held_out, compliant_pairs, draw, harmful_requests
from mechsafe.attacks.evaluate import FastEval, eval_subsets
from mechsafe.drift.config import CONDITIONS, FREEZE_GROUPS, DriftConfig
from mechsafe.drift.stats import comparisons, group_summary, verdict
from mechsafe.drift.track import drift_metrics, initial_state, unit_terms
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig, Freeze, finetune
from mechsafe.finetune.trainer import CHECKPOINTS
from mechsafe.models import cache_dir, model_info
from mechsafe.runs import read_json, stable_hash, write_json
from mechsafe.snip.groups import Group, top_count, unit_scores
from mechsafe.stats import bootstrap
from mechsafe.weights import fingerprint, unit_masks

logger = logging.getLogger(__name__)

TESTED_METRICS = ("relative", "l2", "cosine_distance")
"""Per-unit drift measures compared between groups: ``‖Δ‖/‖w0‖`` (normalised), ``‖Δ‖`` (absolute), ``1 - cos``."""
GROUP_ORDER = ("top-safety", "set-difference", "top-utility", "random")
RECORD_FORMAT = "mechsafe-drift-records/1"


def group_units(groups: dict[str, Group], model: HookedTransformer) -> dict[str, dict[str, np.ndarray]]:
    """``{group: {"neuron": [[layer, index], ...], "head": ...}}`` of unit groups made on ``model``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, g in groups.items():
        g.check_model(model)
        if g.units is None:
            raise MechsafeError(f"group {name!r} is a weight-level group; drift needs unit groups (mechsafe snip groups "
                                "--granularity unit)")
        out[name] = {u: np.array([[x["layer"], x["index"]] for x in g.units if x["kind"] == u], dtype=int).reshape(-1, 2)
                     for u in ("neuron", "head")}
    return out


def freeze_units(model: HookedTransformer, safety, utility, fraction: float, utility_p: float,
                 generator: torch.Generator) -> dict[str, list[tuple[int, str, int]]]:
    """Neuron groups of ``fraction`` of each block's MLP neurons: the top by safety score, the top by safety score
    among the neurons outside the top ``utility_p`` by utility score (set difference at a matched size), and random
    neurons (the same count per block)."""
    safety.check_model(model)
    utility.check_model(model)
    d_mlp = model.cfg.d_mlp
    k = top_count(d_mlp, fraction)
    if k == 0 or k >= d_mlp:
        raise MechsafeError(f"a freeze fraction of {fraction} is {k} of each block's {d_mlp} neurons; choose a share "
                            "that freezes some but not every neuron")
    out: dict[str, list[tuple[int, str, int]]] = {g: [] for g in FREEZE_GROUPS}
    for layer in safety.layers:
        s = unit_scores(model, safety.layer(layer))["neuron"]
        u = unit_scores(model, utility.layer(layer))["neuron"]
        useful = torch.topk(u, top_count(d_mlp, utility_p)).indices
        masked = s.clone()
        masked[useful] = -torch.inf
        chosen = {"top-safety": torch.topk(s, k).indices, "set-difference": torch.topk(masked, k).indices,
                  "random": torch.randperm(d_mlp, generator=generator)[:k]}
        for g, idx in chosen.items():
            out[g] += [(layer, "neuron", int(i)) for i in sorted(idx.tolist())]
    return out


class DriftData:
    """Training pools and the evaluation shared by every run of one study."""

    def __init__(self, model: HookedTransformer, base: HookedTransformer, harmful_eval: Sequence[str],
                 harmless_eval: Sequence[str], config: DriftConfig, progress: bool = True):
        requests = harmful_requests()
        check_held_out(requests, list(harmful_eval) + list(harmless_eval))
        self.pools = {"harmful": compliant_pairs(base, requests, config.answer_tokens, progress=progress),
                      "benign": benign_pairs()}
        fast_harmful, fast_harmless = eval_subsets(harmful_eval, harmless_eval, config.eval_limit, config.seed)
        self.fast = FastEval(model, fast_harmful, fast_harmless, list(harmful_eval))

    def key(self) -> str:
        return stable_hash({"pools": self.pools, "harmful": self.fast.harmful, "harmless": self.fast.harmless})


def _save_record(path: Path, terms: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in terms.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def load_records(folder: Path) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """The records of one drift run, by step."""
    out = []
    for path in sorted(folder.glob("step_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        out.append((load_file(str(path)), meta))
    return out


def drift_run(model: HookedTransformer, clean: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
              config: DriftConfig, seed: int, folder: Path, fast: FastEval, progress: bool = False) -> Path:
    """One tracked fine-tune into ``folder`` (resumed when unfinished, skipped when finished): ``manifest.json``,
    one ``step_NNNNN.safetensors`` record per tracked step and ``done.json`` at the end. The model is restored
    after."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "manifest.json").is_file():
        write_json(folder / "manifest.json", {
            "format": RECORD_FORMAT, "seed": seed, "method": config.method, "lr": config.lr, "steps": config.steps,
            "every": config.every, "n_pairs": len(pairs), "model": model_info(model).to_dict(),
            "tensors": {"neuron": "[n_layers, d_mlp, 3]", "head": "[n_layers, n_heads, 3]"},
            "terms": "per unit: squared initial norm, <initial, change>, squared change (effective weights)",
            "metadata": "meta: step, refusal share and mean score of held-out harmful prompts, answer NLL, seconds"})
    if (folder / "done.json").is_file():
        return folder
    # the trainer checkpoints before it calls back: a kill between the two leaves a checkpoint without its record,
    # so resume from the last checkpoint that has one
    for checkpoint in sorted((folder / "train" / CHECKPOINTS).glob("step-*"), reverse=True):
        if (folder / f"step_{int(checkpoint.name.split('-')[1]):05d}.safetensors").is_file():
            break
        shutil.rmtree(checkpoint)
    initial = initial_state(model, copy=config.method != "lora")
    timing = {"track": 0.0, "eval": 0.0}

    def record(step: int, m: HookedTransformer) -> None:
        t0 = time.perf_counter()
        terms = unit_terms(m, initial)
        t1 = time.perf_counter()
        ev = fast(m)
        t2 = time.perf_counter()
        timing["track"] += t1 - t0
        timing["eval"] += t2 - t1
        _save_record(folder / f"step_{step:05d}.safetensors", terms,
                     {"step": step, **ev, "track_s": t1 - t0, "eval_s": t2 - t1})

    ft = FinetuneConfig(method=config.method, lr=config.lr, steps=config.steps, batch_size=config.batch_size,
                        seed=seed, callback_every=config.every, checkpoint_every=config.every)
    t0 = time.perf_counter()
    try:
        finetune(model, list(pairs), ft, run_dir=folder / "train", progress=progress, callback=record)
    finally:
        restore_weights(model, clean)
    write_json(folder / "done.json", {"seconds": time.perf_counter() - t0, **timing})
    return folder


def freeze_run(model: HookedTransformer, clean: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
               units: Sequence[tuple[int, str, int]], config: DriftConfig, fast: FastEval) -> dict[str, Any]:
    """The harmful fine-tune (full-parameter) with ``units`` frozen (none: plain); refusal and NLL along it, and
    whether every frozen weight is bit-identical at the end. The model is restored after."""
    masks = unit_masks(model, units, ("mlp.W_in", "mlp.W_gate", "mlp.W_out")) if units else {}
    curve: list[dict[str, Any]] = []
    ft = FinetuneConfig(method="full", lr=config.freeze_lr, steps=config.freeze_steps, batch_size=config.batch_size,
                        seed=config.seeds[0], callback_every=config.freeze_every, checkpoint_every=0)
    t0 = time.perf_counter()
    try:
        finetune(model, list(pairs), ft, progress=False, grad_transform=Freeze(masks) if masks else None,
                 callback=lambda step, m: curve.append({"step": step, **fast(m)}))
        params = dict(model.named_parameters())
        identical = all(torch.equal(params[n].detach()[m], clean[n][m]) for n, m in masks.items())
    finally:
        restore_weights(model, clean)
    return {"curve": curve, "frozen_identical": identical, "n_frozen_weights": int(sum(int(m.sum()) for m in masks.values())),
            "seconds": time.perf_counter() - t0}


def run_study(model: HookedTransformer, base: HookedTransformer, harmful_eval: Sequence[str],
              harmless_eval: Sequence[str], config: DriftConfig | None = None, groups: dict[str, Group] | None = None,
              work_dir: str | Path | None = None, scores_dir: str | Path | None = None, progress: bool = True,
              on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole study on ``model`` (unchanged at the end); ``groups``: SNIP unit groups (default: made from the
    model's cached or newly computed SNIP scores). Finished runs are kept in ``work_dir`` (default: under
    ``$MECHSAFE_CACHE/drift``) and reused."""
    from mechsafe.snip import GroupConfig, ScoreConfig, score
    from mechsafe.snip.groups import make_groups

    config = config or DriftConfig()
    if model_info(model).processing not in ("none", "unknown"):
        raise MechsafeError("drift refers to the model's real weights; load it with processing='none'")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    needs_scores = groups is None or bool(config.freeze_fractions)
    if needs_scores:
        safety = score(model, ScoreConfig(data="safety-short", responses=config.responses), scores_dir, progress)
        utility = score(model, ScoreConfig(data="utility", responses=config.responses), scores_dir, progress)
    if groups is None:
        groups = make_groups(model, safety, utility, GroupConfig(granularity="unit", top_fraction=config.group_fraction,
                                                                 safety_q=config.group_fraction,
                                                                 utility_p=config.utility_p, seed=config.seed))
    units = group_units(groups, model)
    timings["groups"] = time.perf_counter() - t0
    data = DriftData(model, base, harmful_eval, harmless_eval, config, progress)
    key = stable_hash({"model": fingerprint(model), "config": dataclasses.asdict(config), "data": data.key()}, 12)
    work = Path(work_dir) if work_dir else cache_dir() / "drift" / key
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    from tqdm.auto import tqdm

    plan = [(c, s) for c in CONDITIONS for s in config.seeds]
    freeze_plan = ([("none", 0.0)] + [(g, f) for f in config.freeze_fractions for g in FREEZE_GROUPS]
                   if config.freeze_fractions else [])
    bar = tqdm(total=len(plan) + len(freeze_plan), disable=not progress, desc="drift study")
    t0 = time.perf_counter()
    for condition, seed in plan:
        drift_run(model, clean, draw(data.pools[condition], config.n_examples, seed), config, seed,
                  work / "runs" / f"{condition}-seed{seed}", data.fast)
        bar.update(1)
        if on_run:
            on_run(f"{condition} seed {seed}")
    timings["drift_runs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    freezing: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(config.seed)
    by_fraction = {f: freeze_units(model, safety, utility, f, config.utility_p, gen) for f in config.freeze_fractions}
    pairs = draw(data.pools["harmful"], config.n_examples, config.seeds[0])
    for group, fraction in freeze_plan:
        path = work / "freeze" / f"{group}-{fraction:g}.json"
        if path.is_file():
            entry = read_json(path)
        else:
            frozen = by_fraction[fraction][group] if group != "none" else []
            entry = {"group": group, "fraction": fraction, "n_neurons": len(frozen),
                     **freeze_run(model, clean, pairs, frozen, config, data.fast)}
            write_json(path, entry)
        freezing.append(entry)
        bar.update(1)
        if on_run:
            on_run(f"freeze {group} {fraction:g}")
    bar.close()
    timings["freezing_runs"] = time.perf_counter() - t0
    result = analyze(work, units, config)
    result.update(config=dataclasses.asdict(config), model=model_info(model).to_dict(), work_dir=str(work),
                  freezing=freezing, timings_s={k: round(v, 1) for k, v in timings.items()},
                  groups={g: {u: int(len(v)) for u, v in us.items()} for g, us in units.items()},
                  group_descriptions={g: groups[g].meta.get("description", "") for g in groups})
    return result


def _values(terms: torch.Tensor, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per-unit drift measures of the units ``idx`` ([[layer, index], ...]) from ``[layers, units, 3]`` terms."""
    m = drift_metrics(terms[idx[:, 0], idx[:, 1]]) if len(idx) else drift_metrics(torch.zeros(0, 3))
    return {"relative": m["relative"].numpy(), "l2": m["l2"].numpy(), "cosine_distance": (1 - m["cosine"]).numpy()}


def analyze(work: Path, units: dict[str, dict[str, np.ndarray]], config: DriftConfig) -> dict[str, Any]:
    """Group statistics, time series, tests and the verdict from the records of the finished drift runs."""
    series: dict[str, Any] = {}
    final: dict[str, dict[str, dict[str, dict[str, np.ndarray]]]] = {}
    evals: dict[str, list[list[dict[str, Any]]]] = {}
    for condition in CONDITIONS:
        runs = [load_records(work / "runs" / f"{condition}-seed{s}") for s in config.seeds]
        steps = sorted(set.intersection(*[{m["step"] for _, m in r} for r in runs]))
        evals[condition] = [[m for _, m in r] for r in runs]
        if condition == CONDITIONS[0]:
            first = runs[0][0][0]  # the initial norms: step 0 of the first run
        for unit in ("neuron", "head"):
            for group in units:
                idx = units[group][unit]
                per_seed_step = [{m["step"]: _values(t[unit], idx) for t, m in r} for r in runs]
                for metric in TESTED_METRICS:
                    means = np.array([[float(np.mean(s[step][metric])) if len(idx) else float("nan") for step in steps]
                                      for s in per_seed_step])
                    bands = [bootstrap(np.mean, np.mean([s[step][metric] for s in per_seed_step], 0), n_boot=200,
                                       seed=config.seed) if len(idx) else None for step in steps]
                    series.setdefault(condition, {}).setdefault(unit, {}).setdefault(metric, {})[group] = {
                        "steps": steps, "per_seed": means.tolist(),
                        "low": [b.low if b else float("nan") for b in bands],
                        "high": [b.high if b else float("nan") for b in bands]}
                    last = np.stack([s[steps[-1]][metric] for s in per_seed_step])  # [seeds, units]
                    final.setdefault(condition, {}).setdefault(unit, {}).setdefault(metric, {})[group] = last
    summaries = {c: {u: {m: {g: group_summary(v, seed=config.seed) for g, v in gs.items() if v.shape[1]}
                         for m, gs in metrics.items()} for u, metrics in us.items()} for c, us in final.items()}
    per_unit = {c: {m: {g: v.mean(0) for g, v in final[c]["neuron"][m].items()} for m in TESTED_METRICS}
                for c in CONDITIONS}
    tests = comparisons(per_unit)
    harmful = [[e["refusal"] for e in run] for run in evals["harmful"]]
    start, end = float(np.mean([r[0] for r in harmful])), float(np.mean([r[-1] for r in harmful]))
    done = [read_json(work / "runs" / f"{c}-seed{s}" / "done.json") for c in CONDITIONS for s in config.seeds]
    train_s = sum(d["seconds"] - d["track"] - d["eval"] for d in done)
    norms = {u: {g: float(first[u][units[g][u][:, 0], units[g][u][:, 1], 0].sqrt().mean()) for g in units
                 if len(units[g][u])} for u in ("neuron", "head")}
    return {"series": series, "summaries": summaries, "tests": tests, "evals": evals, "initial_norms": norms,
            "final_relative": {c: {g: v.tolist() for g, v in per_unit[c]["relative"].items()} for c in CONDITIONS},
            "verdict": verdict(tests, start, end),
            "overhead": {"tracking_over_training": sum(d["track"] for d in done) / train_s,
                         "evaluation_over_training": sum(d["eval"] for d in done) / train_s}}
