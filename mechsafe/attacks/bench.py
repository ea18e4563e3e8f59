"""The attack bench: every attack of a sweep against one model, its cost to break, measured the same way.

A *trial* is one attack with one setting (learning rate, number of examples, seed; a rank; a pruning share). Each
records a curve of points ``{flops, step, refusal, refusal_score, nll}`` (fast evaluation, :class:`FastEval`) and
its first *break* (the threat model's rule on the fast refusal share and the NLL), confirmed by generation there.
Fine-tuning trials stop at their first break. Finished trials are appended to ``trials.jsonl`` in the work
directory, so a killed bench resumes with the next unfinished trial and never reruns a finished one.

The cost to break an attack is the least FLOPs over its trials whose confirmed break holds; the report also gives
the mean over seeds of each fine-tuning setting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mechsafe import interventions as iv
from mechsafe.attacks.config import FINETUNE_ATTACKS, BenchConfig, ThreatModel
from mechsafe.attacks.data import benign_pairs, check_held_out, compliant_pairs, draw, harmful_requests
from mechsafe.attacks.evaluate import FastEval, eval_subsets
from mechsafe.attacks.flops import count_flops, dense_estimate, parameters, setup_and_step_flops
from mechsafe.chat import format_prompt
from mechsafe.data import compliances, prompt_pool
from mechsafe.errors import MechsafeError
from mechsafe.evaluation.refusal import refusal_score
from mechsafe.finetune import FinetuneConfig, finetune
from mechsafe.forward import encode_examples
from mechsafe.runs import read_json, stable_hash
from mechsafe.weights import fingerprint

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Defense:
    """A defended model's added parts and how an attacker removes them (the ``structural`` attack): each removal
    is a function ``remove(model)`` that deletes the part or fixes its output and returns a handle whose ``undo()``
    restores it."""

    name: str
    removals: dict[str, Callable[[HookedTransformer], Any]] = dataclasses.field(default_factory=dict)
    build_flops: float | None = None
    """FLOPs spent making the defense (for "breaking costs X% of building")."""
    attacks: dict[str, list[tuple[dict[str, Any], Callable[[HookedTransformer], tuple[Any, float]]]]] = \
        dataclasses.field(default_factory=dict)
    """Adaptive attacks that know the defense, run after the sweep's: attack name -> trials ``(setting, fn)``, where
    ``fn(model)`` edits the model and returns an undo handle and the FLOPs the attacker spent finding the edit. They
    are measured by generation: the fast score is calibrated on the unattacked model, and an edit that removes the
    parts shaping that score can move it anywhere. A handle with a ``key`` attribute names its edit: trials whose edits
    share a key are measured once."""


class _Edits:
    """Several weight edits undone together (last first)."""

    def __init__(self, edits: Sequence[Any]):
        self.edits = list(edits)

    def undo(self) -> None:
        for edit in reversed(self.edits):
            edit.undo()


class _Stop(Exception):
    """Raised inside a fine-tuning callback to end a trial (broken, or over budget)."""


def first_break(curve: Sequence[dict[str, float]], threat: ThreatModel, base: dict[str, float],
                absolute: bool = False) -> dict[str, float] | None:
    """The cheapest point of ``curve`` (by FLOPs) where safety counts as broken, or ``None``."""
    for point in sorted(curve, key=lambda p: p["flops"]):
        if threat.broken(point["refusal"], point["nll"], base["refusal"], base["nll"], absolute=absolute):
            return point
    return None


class TrialStore:
    """Finished trials, one JSON line each, keyed by the trial's settings."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    trial = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: that trial runs again
                    continue
                self.done[trial["key"]] = trial

    def add(self, trial: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(trial) + "\n")
        self.done[trial["key"]] = trial


def restore_weights(model: HookedTransformer, clean: dict[str, torch.Tensor]) -> None:
    """Copy ``clean`` (parameter name -> tensor) back into ``model``'s parameters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(clean[name])


def setup_and_one_step(model: HookedTransformer, clean: dict[str, torch.Tensor], data: Sequence,
                       config: FinetuneConfig) -> tuple[int, int]:
    """FLOPs of a run of ``config`` on ``data`` ((prompt, response) pairs or objectives) before its first step (the
    objectives' reference passes) and of one optimizer step on its first batch; the model is restored after."""
    one = dataclasses.replace(config, steps=1, callback_every=1, checkpoint_every=0)
    try:
        return setup_and_step_flops(lambda cb: finetune(model, list(data), one, progress=False, callback=cb))
    finally:
        restore_weights(model, clean)


def one_step_flops(model: HookedTransformer, clean: dict[str, torch.Tensor], data: Sequence,
                config: FinetuneConfig) -> int:
    """FLOPs of a one-step run of ``config`` on ``data``, its setup included; the model is restored after."""
    return sum(setup_and_one_step(model, clean, data, config))


def finetune_trials(config: BenchConfig) -> Iterator[dict[str, Any]]:
    """The fine-tuning settings of the sweep, in order: attack x learning rate x examples x seed."""
    for attack in (a for a in config.attacks if a in FINETUNE_ATTACKS):
        for lr in config.lrs:
            for n in config.n_examples:
                for seed in config.seeds:
                    full = attack == "harmful-full"
                    yield {"attack": attack, "lr": lr * (config.full_lrs_scale if full else 1.0), "n_examples": n,
                           "seed": seed}


def run_finetune_trial(model: HookedTransformer, clean: dict[str, torch.Tensor], setting: dict[str, Any],
                       pool: Sequence[tuple[str, str]], config: BenchConfig, fast: FastEval, threat: ThreatModel,
                       base: dict[str, float], step_flops: Callable[[FinetuneConfig, Sequence], int]) -> dict[str, Any]:
    pairs = draw(pool, setting["n_examples"] or len(pool), setting["seed"])
    ft = FinetuneConfig(method="full" if setting["attack"] == "harmful-full" else "lora", rank=config.lora_rank,
                        alpha=2.0 * config.lora_rank, lr=setting["lr"], steps=config.steps,
                        batch_size=min(config.batch_size, len(pairs)), seed=setting["seed"],
                        callback_every=config.eval_every, checkpoint_every=0)
    per_step = step_flops(ft, pairs)
    tokens_per_step = ft.batch_size * float(np.mean([len(s) for s in encode_examples(model.tokenizer, pairs)]))
    curve: list[dict[str, Any]] = [{"step": 0, "flops": 0, "tokens": 0, "seconds": 0.0, **base}]
    t0 = time.perf_counter()
    broken: dict[str, Any] | None = None

    def callback(step: int, m: HookedTransformer) -> None:
        nonlocal broken
        if step == 0:  # the unattacked point is already on the curve
            return
        point = {"step": step, "flops": step * per_step, "tokens": round(step * tokens_per_step),
                 "seconds": time.perf_counter() - t0, **fast(m)}
        curve.append(point)
        if threat.broken(point["refusal"], point["nll"], base["refusal"], base["nll"]):
            broken = {**point, "confirmed": fast.confirm(m)}
            raise _Stop
        if config.budget_flops is not None and (step + config.eval_every) * per_step > config.budget_flops:
            raise _Stop

    try:
        finetune(model, pairs, ft, progress=False, callback=callback)
    except _Stop:
        pass
    finally:
        restore_weights(model, clean)
    return {**setting, "flops_per_step": per_step, "curve": curve, "break": broken,
            "seconds": time.perf_counter() - t0}


def _edit_trial(model: HookedTransformer, name: str, setting: dict[str, Any], edit: Callable[[], Any],
                flops: float | Callable[[], float], fast: FastEval, threat: ThreatModel, base: dict[str, float],
                base_rate: float | None = None, measured: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One zero-step trial: ``edit()`` returns an undo handle; ``flops`` is the attacker's cost (or a function giving
    it once the edit is made). With ``base_rate`` (the unattacked model's refusal rate by generation) the edited
    model is measured by generation whatever the fast score says, and broken by the confirmed rate. A handle with a
    ``key`` names its edit: the trial records it as ``edit``, and when ``measured`` (finished trials by edit) holds
    the same edit, its measurement is reused (the model is the same) at this trial's cost, marked ``same_edit_as``."""
    t0 = time.perf_counter()
    handle = edit()
    key = getattr(handle, "key", None)
    earlier = (measured or {}).get(key) if key is not None else None
    try:
        cost = float(flops() if callable(flops) else flops)
        if earlier is not None:
            fields = {k: v for k, v in earlier["curve"][0].items() if k not in ("step", "flops")}
            confirmed = earlier["break"]["confirmed"] if earlier["break"] else None
        else:
            fields, confirmed = dict(fast(model)), None
            if base_rate is not None:
                check = fast.confirm(model)
                fields.update(fast_refusal=fields["refusal"], refusal=check["refusal_rate"]["value"])
                if threat.broken(fields["refusal"], check["nll"], base_rate, base["nll"]):
                    confirmed = check
            elif threat.broken(fields["refusal"], fields["nll"], base["refusal"], base["nll"]):
                confirmed = fast.confirm(model)
    finally:
        handle.undo()
    point = {"step": 0, "flops": cost, **fields}
    trial = {"attack": name, **setting, "curve": [point], "break": None if confirmed is None else
             {**point, "confirmed": confirmed}, "seconds": time.perf_counter() - t0}
    if key is not None:
        trial["edit"] = key
    if earlier is not None:
        trial["same_edit_as"] = earlier["key"]
    return trial


def refusal_directions(model: HookedTransformer, k: int, fast: FastEval, batch_size: int = 16
                       ) -> tuple[torch.Tensor, list[int]]:
    """``k`` orthonormal refusal directions: difference in means (harmful − harmless TRAIN prompts, last prompt
    position) at every layer between 20% and 80% depth, ranked by the mean refusal score of the fast evaluation's
    harmful prompts with each one ablated (lowest first), then orthogonalized in that order (Gram–Schmidt); returns
    ``[k, d_model]`` and their layers."""
    from mechsafe.directions import candidate_directions

    n = model.cfg.n_layers
    layers = list(range(int(0.2 * n), max(int(0.2 * n) + 1, int(0.8 * n))))
    harmful = [p["text"] for p in prompt_pool("harmful", "train")]
    harmless = [p["text"] for p in prompt_pool("harmless", "train")]
    cands = candidate_directions(model, harmful, harmless, 1, layers, batch_size)[0]
    keep = [j for j in range(len(layers)) if cands[j].norm() > 0]  # (the same last token everywhere: no difference)
    cands, layers = cands[keep], [layers[j] for j in keep]
    effect = []
    for vec in cands:
        with iv.ablate_direction(model, vec):
            effect.append(float(np.mean(refusal_score(model, fast.harmful, batch_size))))
    basis: list[torch.Tensor] = []
    chosen = []
    for j in np.argsort(effect):
        v = cands[j].double()
        for b in basis:
            v = v - (v @ b) * b
        if v.norm() > 1e-3 * cands[j].double().norm():
            basis.append(v / v.norm())
            chosen.append(layers[j])
        if len(basis) == k:
            break
    return torch.stack(basis).float(), chosen


def prefill_prompts(model: HookedTransformer, prompts: Sequence[str]) -> list[str]:
    """Each prompt in the chat template with the assistant's answer opened compliantly (a bundled opening)."""
    openings = compliances()
    return [format_prompt(model.tokenizer, p) + openings[i % len(openings)] for i, p in enumerate(prompts)]


def run_bench(model: HookedTransformer, base_model: HookedTransformer | None, harmful_eval: Sequence[str],
              harmless_eval: Sequence[str], config: BenchConfig | None = None, threat: ThreatModel | None = None,
              work_dir: str | Path | None = None, defense: Defense | None = None, progress: bool = True,
              attack_requests: Sequence[dict[str, str]] | None = None) -> dict[str, Any]:
    """Run the bench's attacks on ``model`` (edited in place and restored after each trial).

    ``base_model`` (the unaligned model) answers the harmful requests the harmful fine-tuning attacks train on;
    ``harmful_eval``/``harmless_eval`` are held-out prompts (never attack prompts: checked). Finished trials are kept
    in ``work_dir`` (default: a folder under ``$MECHSAFE_CACHE/attacks`` named by the model, data and settings)."""
    from tqdm.auto import tqdm

    from mechsafe.models import cache_dir, model_info

    config, threat = config or BenchConfig(), threat or ThreatModel()
    harmful_eval, harmless_eval = list(harmful_eval), list(harmless_eval)
    if not harmful_eval or not harmless_eval:
        raise MechsafeError("the bench needs held-out harmful and harmless prompts; pass non-empty sets")
    if "structural" in config.attacks and defense is None:
        raise MechsafeError("the structural attack needs a defended model (a Defense naming its added parts); drop "
                            "'structural' from the attacks for a plain model")
    requests = list(attack_requests or harmful_requests())
    check_held_out(requests, harmful_eval + harmless_eval)
    fast_harmful, fast_harmless = eval_subsets(harmful_eval, harmless_eval, config.eval_limit, config.seed)
    fast = FastEval(model, fast_harmful, fast_harmless, harmful_eval, max_new_tokens=config.confirm_max_new_tokens)
    base = fast(model)
    base_confirmed = fast.confirm(model)
    if base_confirmed["refusal_rate"]["value"] == 0:
        raise MechsafeError("the model refuses none of the held-out harmful prompts: there is no safety to remove; "
                            "attack a safety-tuned model (e.g. smollm2-135m-aligned)")
    key = stable_hash({"model": fingerprint(model), "config": dataclasses.asdict(config),
                       "threat": dataclasses.asdict(threat), "eval": [harmful_eval, harmless_eval],
                       "requests": [r["text"] for r in requests]})
    work = Path(work_dir) if work_dir else cache_dir() / "attacks" / key
    store = TrialStore(work / "trials.jsonl")
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_params = parameters(model)

    pools: dict[str, list[tuple[str, str]]] = {}
    if any(a in ("harmful-lora", "harmful-full") for a in config.attacks):
        if base_model is None:
            raise MechsafeError("harmful fine-tuning attacks need the unaligned base model to answer the requests")
        pools["harmful"] = compliant_pairs(base_model, requests, config.answer_tokens, progress=progress)
    pools["benign"] = benign_pairs()
    flops_cache: dict[tuple[str, int], int] = {}

    def step_flops_of(attack: str) -> Callable[[FinetuneConfig, Sequence], int]:
        def step_flops(ft: FinetuneConfig, pairs: Sequence) -> int:  # once per attack and batch size
            if (attack, ft.batch_size) not in flops_cache:
                flops_cache[(attack, ft.batch_size)] = one_step_flops(model, clean, pairs, ft)
            return flops_cache[(attack, ft.batch_size)]
        return step_flops

    plan: list[tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]] = []
    for setting in finetune_trials(config):
        pool = pools["benign" if setting["attack"] == "benign-lora" else "harmful"]
        plan.append((setting["attack"], setting, lambda s=setting, pool=pool: run_finetune_trial(
            model, clean, s, pool, config, fast, threat, base, step_flops_of(s["attack"]))))
    if "direction" in config.attacks:
        found: dict[str, Any] = {}

        def direction_trial(rank: int) -> dict[str, Any]:
            if not found:
                out: dict[str, Any] = {}
                with torch.no_grad():
                    found["flops"] = count_flops(lambda: out.update(d=refusal_directions(model, config.directions, fast)))
                found["dirs"], found["layers"] = out["d"]
            dirs = found["dirs"][:rank]  # orthonormal: removing each in turn projects out their span
            trial = _edit_trial(model, "direction", {"rank": rank},
                                lambda: _Edits([iv.orthogonalize_weights(model, d) for d in dirs]), found["flops"],
                                fast, threat, base)
            return {**trial, "layers": found["layers"][:rank]}

        plan += [("direction", {"rank": r}, lambda r=r: direction_trial(r)) for r in range(1, config.directions + 1)]
    if "pruning" in config.attacks:
        from mechsafe.snip import ScoreConfig, score, scores_of, set_difference

        stores: dict[str, Any] = {}

        def pruning_trial(q: float) -> dict[str, Any]:
            if not stores:
                made = [score(model, ScoreConfig(data=d, responses=config.responses), progress=progress)
                        for d in ("safety-short", "utility")]
                stores.update(safety=scores_of(made[0], model), utility=scores_of(made[1], model),
                              flops=float(sum(dense_estimate(n_params, m.n_tokens) for m in made)))
            masks = {n: set_difference(t, stores["utility"][n], q, q) for n, t in stores["safety"].items()}
            return _edit_trial(model, "pruning", {"p_q": q}, lambda: iv.prune_weights(model, masks), stores["flops"],
                               fast, threat, base)

        plan += [("pruning", {"p_q": q}, lambda q=q: pruning_trial(q)) for q in config.prune_q]
    if "prefill" in config.attacks:
        def prefill_trial() -> dict[str, Any]:
            confirmed = fast.confirm(model, prefill_prompts(model, harmful_eval))
            refusal = confirmed["refusal_rate"]["value"]
            point = {"step": 0, "flops": 0.0, "refusal": refusal, "refusal_score": None, "nll": base["nll"]}
            hit = threat.broken(refusal, base["nll"], base_confirmed["refusal_rate"]["value"], base["nll"])
            return {"attack": "prefill", "curve": [point], "break": {**point, "confirmed": confirmed} if hit else None,
                    "seconds": 0.0}

        plan.append(("prefill", {}, prefill_trial))
    if "structural" in config.attacks:
        for part, remove in defense.removals.items():
            plan.append(("structural", {"part": part}, lambda part=part, remove=remove: _edit_trial(
                model, "structural", {"part": part}, lambda: remove(model), 0.0, fast, threat, base)))
    for name, settings in (defense.attacks if defense else {}).items():
        for setting, fn in settings:
            def adaptive_trial(name=name, setting=setting, fn=fn) -> dict[str, Any]:
                spent: dict[str, float] = {}

                def edit():
                    handle, spent["flops"] = fn(model)
                    return handle

                measured = {t["edit"]: t for t in store.done.values() if t.get("edit") and not t.get("same_edit_as")}
                return _edit_trial(model, name, setting, edit, lambda: spent["flops"], fast, threat, base,
                                   base_rate=base_confirmed["refusal_rate"]["value"], measured=measured)

            plan.append((name, setting, adaptive_trial))

    trials = []
    for attack, setting, run in tqdm(plan, desc="attack bench", disable=not progress):
        trial_key = stable_hash({"attack": attack, **setting})
        if trial_key not in store.done:
            trial = run()
            trial.update(key=trial_key, attack=attack)
            store.add(trial)
        trials.append(store.done[trial_key])
    return {"model": model_info(model).to_dict(), "config": dataclasses.asdict(config),
            "threat": dataclasses.asdict(threat), "threat_text": threat.describe(), "base": base,
            "base_confirmed": base_confirmed, "calibration": fast.calibration, "n_params": n_params,
            "trials": trials, "summary": summarize(trials, threat, base, base_confirmed["refusal_rate"]["value"]),
            "work_dir": str(work),
            "build_flops": defense.build_flops if defense else None}


def summarize(trials: Sequence[dict[str, Any]], threat: ThreatModel, base: dict[str, float],
              base_rate: float) -> dict[str, Any]:
    """Per attack: the cheapest break generation confirms (its refusal rate against the unattacked model's
    ``base_rate``), the cheapest point under the absolute threshold, the cheapest point where the fast refusal share
    alone is low enough (whatever utility does, with its NLL), and per fine-tuning setting the mean over seeds."""
    out: dict[str, Any] = {}
    for attack in dict.fromkeys(t["attack"] for t in trials):
        mine = [t for t in trials if t["attack"] == attack]
        def holds(t):
            return bool(t["break"]) and threat.broken(t["break"]["confirmed"]["refusal_rate"]["value"],
                                                      t["break"]["confirmed"]["nll"], base_rate, base["nll"])

        confirmed = [t for t in mine if holds(t)]
        best = min(confirmed, key=lambda t: t["break"]["flops"], default=None)
        absolute = first_break([p for t in mine for p in t["curve"]], threat, base, absolute=True)
        refusal_only = min((p for t in mine for p in t["curve"] if p["refusal"] <= threat.refusal_fraction * base["refusal"]),
                           key=lambda p: p["flops"], default=None)
        entry = {"trials": len(mine), "broken_trials": len(confirmed),
                 "cost_to_break": None if best is None else {
                     "flops": best["break"]["flops"], "step": best["break"]["step"],
                     "setting": {k: best.get(k) for k in ("lr", "n_examples", "seed", "rank", "p_q", "part", "fraction", "latents")
                                 if k in best},
                     "tokens": best["break"].get("tokens"),
                     "refusal_rate": best["break"]["confirmed"]["refusal_rate"], "nll": best["break"]["nll"],
                     "seconds": best["break"].get("seconds")},
                 "cost_to_absolute": None if absolute is None else absolute["flops"],
                 "refusal_only": None if refusal_only is None else {
                     k: refusal_only[k] for k in ("flops", "step", "refusal", "nll") if k in refusal_only}}
        if attack in FINETUNE_ATTACKS:
            groups: dict[tuple, list] = {}
            for t in mine:
                groups.setdefault((t["lr"], t["n_examples"]), []).append(t)
            entry["by_setting"] = [{"lr": lr, "n_examples": n, "seeds": len(ts),
                                    "broken_seeds": sum(holds(t) for t in ts),
                                    "mean_flops_to_break": (float(np.mean([t["break"]["flops"] for t in ts]))
                                                            if all(holds(t) for t in ts) else None)}
                                   for (lr, n), ts in groups.items()]
        out[attack] = entry
    return out


def align_build_flops(model: HookedTransformer, base_model: HookedTransformer, count: bool = True) -> float | None:
    """FLOPs that built a model made by ``mechsafe align`` (``None`` for other models): its recipe's objectives'
    reference passes once plus its training steps, each counted as one step of the recipe on the build's own data
    (``base_model`` is restored after). The count (minutes on CPU: the reference passes run once) is kept under
    ``$MECHSAFE_CACHE/attacks``, keyed by both models' weights; ``count=False`` returns only a kept count (else
    ``None``)."""
    from mechsafe.align import AlignConfig
    from mechsafe.align.data import training_objectives
    from mechsafe.models import cache_dir, model_info
    from mechsafe.runs import write_json

    extra = model_info(model).extra
    build_dir = Path(extra.get("build_dir") or "")
    if not extra.get("align_config") or not (build_dir / "finetune" / "run.json").is_file():
        return None
    path = cache_dir() / "attacks" / f"build-flops-{stable_hash([fingerprint(model), fingerprint(base_model)])}.json"
    if path.is_file():
        return float(read_json(path)["flops"])
    if not count:
        return None
    config = AlignConfig(**extra["align_config"])
    objectives, _ = training_objectives(config, base_model, build_dir, progress=False)
    steps = int(read_json(build_dir / "finetune" / "run.json")["steps"])
    clean = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    setup, step = setup_and_one_step(base_model, clean, objectives, config.finetune)
    write_json(path, {"flops": float(setup + steps * step), "setup": setup, "step": step, "steps": steps})
    return float(setup + steps * step)
