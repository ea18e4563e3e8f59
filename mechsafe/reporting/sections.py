"""The report's five sections, each a function of one model (and, for utility, the first model) returning plain JSON.

Each section's result is cached under ``$MECHSAFE_CACHE/report/<section>/`` keyed by the model's weight
fingerprint, the section's settings and its prompts, so a second report of the same model runs no forward pass for
the sections it already has. A section that cannot be measured on a model (e.g. the attack bench on a model that
refuses nothing) records why instead of failing the report.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.reporting.config import ReportConfig
from mechsafe.runs import read_json, stable_hash, write_json
from mechsafe.stats import paired_rate_difference, proportion

logger = logging.getLogger(__name__)

_VERSION = 1


@dataclasses.dataclass
class Prompts:
    """The held-out prompt sets every section measures on."""

    harmful: list[str]
    harmless: list[str]
    where: dict[str, str]


def cached_section(name: str, model_fp: str, settings: dict[str, Any], compute: Callable[[], dict[str, Any]]
                   ) -> dict[str, Any]:
    """``compute()``'s result, from the cache when this model and these settings have it."""
    from mechsafe.models import cache_dir

    key = stable_hash({"section": name, "model": model_fp, "settings": settings, "version": _VERSION}, 20)
    path = cache_dir() / "report" / name / f"{key}.json"
    if path.is_file():
        try:
            return {**read_json(path), "cached": True}
        except (OSError, ValueError):
            logger.warning("ignoring the unreadable cached section %s", path)
    result = compute()
    write_json(path, result)
    return {**result, "cached": False}


def _spaced_layers(n_layers: int, count: int) -> str:
    if count == 0 or count >= n_layers:
        return "all"
    return ",".join(str(int(round(i * (n_layers - 1) / (count - 1)))) for i in range(count)) if count > 1 else "0"


def harm(model: HookedTransformer, prompts: Prompts, cfg: ReportConfig) -> dict[str, Any]:
    """Where harm is represented: test AUROC of dense probes per layer (last and mean pooling) against TF-IDF."""
    from mechsafe.probes import probe_bench
    from mechsafe.probes.config import ProbeBenchConfig

    layers = _spaced_layers(model.cfg.n_layers, cfg.probe_layers)
    bench = probe_bench(ProbeBenchConfig(data=cfg.probe_data, layers=layers, pooling=["last", "mean"],
                                         methods=["dense", "tfidf"], cs=list(cfg.probe_cs), n_boot=cfg.n_boot,
                                         seed=cfg.seed, name="report"), model=model, runs_dir=None)
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in bench.results:
        if r.layer is not None:
            curves.setdefault(r.method, []).append({"layer": r.layer, "auroc": r.test["auroc"].to_dict()})
    tfidf = next(r for r in bench.results if r.method == "tfidf")
    best = max((r for r in bench.results if r.layer is not None), key=lambda r: r.val["auroc"])
    comparison = next((c for c in bench.comparisons if c.b == "tfidf"), None)
    return {"data": cfg.probe_data, "layers": layers, "curves": {k: sorted(v, key=lambda p: p["layer"])
                                                                   for k, v in curves.items()},
            "tfidf": tfidf.test["auroc"].to_dict(),
            "best": {"method": best.method, "layer": best.layer, "auroc": best.test["auroc"].to_dict()},
            "best_vs_tfidf": None if comparison is None else {"difference": comparison.difference.to_dict(),
                                                               "verdict": comparison.verdict}}


def _flags(model: HookedTransformer, texts: Sequence[str], max_new_tokens: int) -> np.ndarray:
    from mechsafe.evaluation import generate, refusal_flags

    return np.asarray(refusal_flags(generate(model, list(texts), max_new_tokens=max_new_tokens, progress=False)),
                      dtype=bool)


def refusal(model: HookedTransformer, prompts: Prompts, cfg: ReportConfig) -> dict[str, Any]:
    """What carries refusal: the selected refusal direction and its ablation (harmful prompts) and induction
    (harmless prompts) effects, each rate with its Wilson interval and the paired change. When the model refuses
    none of the training prompts by its refusal score, the means are taken over all prompts (``filtered`` False)."""
    import mechsafe as ms
    from mechsafe import interventions as iv
    from mechsafe.directions import select_refusal_direction

    overrides = dict(cfg.selection or {})
    data = ms.data.load("harmful"), ms.data.load("harmless")
    try:
        rd = select_refusal_direction(model, *data, progress=False, **overrides)
        filtered = overrides.get("filter_train", True)
    except MechsafeError as exc:
        # a model that refuses none of the prompts by its refusal score (e.g. a base model) gets the unfiltered means
        if "filter" not in str(exc) or overrides.get("filter_train") is False:
            return {"skipped": str(exc)}
        try:
            rd = select_refusal_direction(model, *data, progress=False, **{**overrides, "filter_train": False,
                                                                           "filter_val": False})
        except MechsafeError as again:
            return {"skipped": str(again)}
        filtered = False
    n = cfg.max_new_tokens
    refused = _flags(model, prompts.harmful, n)
    over = _flags(model, prompts.harmless, n)
    with iv.ablate_direction(model, rd.direction):
        ablated = _flags(model, prompts.harmful, n)
    with iv.steer(model, rd.direction, layers=[rd.layer], coeff=1.0):
        induced = _flags(model, prompts.harmless, n)
    return {"layer": rd.layer, "position": rd.position, "norm": float(rd.direction.norm()), "filtered": bool(filtered),
            "refusal": proportion(refused).to_dict(), "refusal_ablated": proportion(ablated).to_dict(),
            "ablation_effect": paired_rate_difference(ablated, refused, seed=cfg.seed).to_dict(),
            "over_refusal": proportion(over).to_dict(), "refusal_induced": proportion(induced).to_dict(),
            "induction_effect": paired_rate_difference(induced, over, seed=cfg.seed).to_dict()}


def weights(model: HookedTransformer, prompts: Prompts, cfg: ReportConfig) -> dict[str, Any]:
    """Which weights are safety-critical: the refusal share and reference-answer NLL as SNIP's set difference (top
    safety minus top utility weights, ``p = q``) and matched random sets are pruned."""
    from mechsafe.snip.config import StudyConfig
    from mechsafe.snip.study import run_study

    study = run_study(model, prompts.harmful, prompts.harmless,
                      StudyConfig(sparsities=(), ranks=(), set_difference=cfg.prune_q, responses="bundled",
                                  score_samples=cfg.score_samples, max_new_tokens=cfg.max_new_tokens,
                                  utility_max_new_tokens=cfg.max_new_tokens, limit=cfg.limit, seed=cfg.seed),
                      progress=False)
    keep = ("method", "setting", "sparsity", "refusal_share", "answer_nll")
    points = [{k: p[k] for k in keep} for p in study["points"] if p["method"] in ("none", "set-difference", "random")]
    claims = [{"claim": c["claim"], "holds": c["holds"]} for c in study["verdict"]["claims"]]
    return {"points": points, "claims": claims}


def attacks(model: HookedTransformer, prompts: Prompts, cfg: ReportConfig) -> dict[str, Any]:
    """How brittle: the attack bench's cost to break each attack (FLOPs, steps, seconds) at its threat model."""
    from mechsafe.attacks import run_bench
    from mechsafe.attacks.config import BenchConfig

    base = None
    if any(a.startswith("harmful-") for a in cfg.attacks):
        from mechsafe.models import load_model

        base = load_model(cfg.attack_base, processing="none", device=str(model.cfg.device))
    config = BenchConfig(attacks=cfg.attacks, eval_limit=cfg.limit or BenchConfig().eval_limit, responses="bundled",
                         confirm_max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    try:
        bench = run_bench(model, base, prompts.harmful, prompts.harmless, config, progress=False)
    except MechsafeError as exc:
        return {"skipped": str(exc)}
    per_attack = {}
    for name, s in bench["summary"].items():
        hit = s.get("cost_to_break")
        per_attack[name] = {"broken": hit is not None, "trials": s.get("trials"), "broken_trials": s.get("broken_trials"),
                            "flops": None if hit is None else hit["flops"], "step": None if hit is None else hit["step"],
                            "seconds": None if hit is None else hit["seconds"],
                            "refusal_rate": None if hit is None else hit["refusal_rate"]}
    return {"attacks": per_attack, "base_refusal": bench["base_confirmed"]["refusal_rate"]}


def utility(model: HookedTransformer, prompts: Prompts, cfg: ReportConfig, reference: HookedTransformer | None
            ) -> dict[str, Any]:
    """Refusal, over-refusal, arithmetic accuracy, reference-answer NLL and KL to the first model; the per-prompt
    flags are kept for paired differences between models."""
    from mechsafe.evaluation import evaluate

    result = evaluate(model, prompts.harmful, prompts.harmless, max_new_tokens=cfg.max_new_tokens,
                      reference_model=reference, utility=True, progress=False, utility_limit=cfg.utility_limit,
                      utility_max_new_tokens=64, seed=cfg.seed)
    flags = {name: [bool(s.get("refused")) for s in result.samples if s["set"] == name]
             for name in ("harmful", "harmless")}
    flags["math"] = [bool(s["correct"]) for s in result.samples if s["set"] == "math"]
    out = {k: (None if getattr(result, k) is None else getattr(result, k).to_dict())
           for k in ("refusal_rate", "over_refusal", "utility_accuracy", "answer_nll", "kl_harmless")}
    return {**out, "flags": flags}


def paired(first: dict[str, Any], other: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Paired differences (other − first) of the utility section's per-prompt flags: refusal, over-refusal and
    arithmetic accuracy on the same prompts."""
    out = {}
    for key, name in (("refusal_rate", "harmful"), ("over_refusal", "harmless"), ("utility_accuracy", "math")):
        a, b = other["flags"].get(name), first["flags"].get(name)
        if a and b and len(a) == len(b):
            out[key] = paired_rate_difference(a, b, seed=seed).to_dict()
    return out
