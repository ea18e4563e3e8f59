"""One safety report per model, and several models side by side (``mechsafe report``, ``mechsafe.report``).

For each model, five sections measured on the same held-out prompts (see :mod:`mechsafe.reporting.sections`):
where harm is represented (probes per layer against TF-IDF), what carries refusal (the refusal direction, ablated
and added), which weights are safety-critical (SNIP set-difference pruning against random), how brittle safety is
(the attack bench's cost to break) and utility (refusal, over-refusal, arithmetic, reference-answer NLL, KL to the
first model). With several models: one comparison table, paired differences against the first model, overlaid
curves. Output, in one run directory: ``report.md``, a self-contained ``report.html``, ``figures/*.png`` and
``results.json``; every number on the page is a number of ``results.json``.

Example::

    import mechsafe as ms
    out = ms.report(["smollm2-135m-instruct", "smollm2-135m-aligned"], ms.reporting.ReportConfig(profile="quick"))
    print(out["run_dir"])
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from mechsafe.errors import MechsafeError
from mechsafe.reporting import render, sections
from mechsafe.reporting.config import PROFILES, SECTIONS, ReportConfig

logger = logging.getLogger(__name__)

__all__ = ["PROFILES", "SECTIONS", "ReportConfig", "report"]

FIGURES = {"harm": ("harm.png", render.plot_harm, "test AUROC of dense probes by layer (last and mean pooling); "
                                                   "dotted: TF-IDF"),
           "refusal": ("refusal.png", render.plot_refusal, "refusal and its direction: ablated on harmful prompts, "
                                                           "added on harmless ones"),
           "weights": ("weights.png", render.plot_weights, "refusal share as SNIP set-difference (solid) and matched "
                                                           "random (dashed) weights are pruned"),
           "attacks": ("attacks.png", render.plot_attacks, "cost to break each attack (FLOPs, log scale)")}


def _prompts(cfg: ReportConfig) -> sections.Prompts:
    from mechsafe.data import load_texts

    sets, where = {}, {}
    for kind in ("harmful", "harmless"):
        texts, source = load_texts(getattr(cfg, kind))
        sets[kind] = texts[:cfg.limit] if cfg.limit else texts
        where[kind] = source if len(sets[kind]) == len(texts) else f"the first {len(sets[kind])} of {source}"
    return sections.Prompts(sets["harmful"], sets["harmless"], where)


def _settings(name: str, cfg: ReportConfig, prompts: sections.Prompts, reference_fp: str | None) -> dict[str, Any]:
    common = {"harmful": prompts.harmful, "harmless": prompts.harmless, "max_new_tokens": cfg.max_new_tokens,
              "seed": cfg.seed}
    per = {"harm": {"data": cfg.probe_data, "layers": cfg.probe_layers, "cs": cfg.probe_cs, "n_boot": cfg.n_boot,
                    "seed": cfg.seed},
           "refusal": {**common, "selection": cfg.selection},
           "weights": {**common, "prune_q": cfg.prune_q, "score_samples": cfg.score_samples, "limit": cfg.limit},
           "attacks": {**common, "attacks": cfg.attacks, "base": cfg.attack_base if any(
               a.startswith("harmful-") for a in cfg.attacks) else None},
           "utility": {**common, "utility_limit": cfg.utility_limit, "reference": reference_fp}}
    return per[name]


def report(models: str | Sequence[str], config: ReportConfig | None = None, runs_dir: str | Path = "runs",
           device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Measure every section of the report for each model (reusing cached sections), write the run directory and
    return ``results.json``'s content plus ``run_dir``."""
    from tqdm.auto import tqdm

    from mechsafe.models import load_model
    from mechsafe.runs import start_run
    from mechsafe.weights import fingerprint

    specs = [models] if isinstance(models, str) else list(models)
    if not specs:
        raise MechsafeError("no model to report on; pass one or more model specs")
    cfg = (config or ReportConfig()).resolved()
    prompts = _prompts(cfg)
    first = load_model(specs[0], processing="none", device=device)  # every spec is checked before anything is measured
    fps = {specs[0]: fingerprint(first)}
    for spec in specs[1:]:  # only the first model stays in memory (the reference of KL and paired differences)
        fps[spec] = fingerprint(load_model(spec, processing="none", device=device))
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(specs) * len(cfg.sections), desc="report", unit="section", disable=not progress)
    for i, spec in enumerate(specs):
        model = first if i == 0 else None
        entry = {"name": spec, "fingerprint": fps[spec], "sections": {}, "seconds": {}}
        for name in cfg.sections:
            reference = None if i == 0 else fps[specs[0]]

            def compute(name=name):
                nonlocal model
                if model is None:
                    model = load_model(spec, processing="none", device=device)
                fn = getattr(sections, name)
                return fn(model, prompts, cfg, None if i == 0 else first) if name == "utility" else fn(model, prompts, cfg)

            t0 = time.perf_counter()
            bar.set_postfix(model=spec, section=name)
            entry["sections"][name] = sections.cached_section(name, fps[spec], _settings(name, cfg, prompts, reference), compute)
            entry["seconds"][name] = round(time.perf_counter() - t0, 1)
            bar.update(1)
        results.append(entry)
    bar.close()
    out = {"config": cfg.to_dict(), "ci_level": 0.95, "data": {**prompts.where, "n_harmful": len(prompts.harmful),
                                             "n_harmless": len(prompts.harmless)},
           "models": results}
    if len(results) > 1 and "utility" in cfg.sections:
        out["paired"] = {m["name"]: sections.paired(results[0]["sections"]["utility"], m["sections"]["utility"],
                                                    cfg.seed) for m in results[1:]}
    blocks, figures = page(out)
    with start_run(runs_dir, "report", config=cfg.to_dict(), seed=cfg.seed, processing="none") as run:
        (run.tmp / "figures").mkdir()
        for fname, data in figures.items():
            (run.tmp / "figures" / fname).write_bytes(data)
        run.write_text("report.md", render.markdown(blocks))
        run.write_text("report.html", render.to_html(blocks, figures, "mechsafe safety report"))
        run.write_json("results.json", out)
    return {**out, "run_dir": str(run.path)}


def _headline(m: dict[str, Any]) -> list[str]:
    s = m["sections"]
    harm, ref, w, att, util = (s.get(k) or {} for k in ("harm", "refusal", "weights", "attacks", "utility"))
    best = harm.get("best")
    top_q = max((p for p in w.get("points", []) if p["method"] == "set-difference"), key=lambda p: p["setting"],
                default=None)
    broken = [a["flops"] for a in (att.get("attacks") or {}).values() if a["broken"]]
    return [m["name"],
            f"{render.est(best['auroc'])} ({best['method']}, layer {best['layer']})" if best else "—",
            render.est(harm.get("tfidf")),
            render.est(ref.get("refusal_ablated")),
            render.est(top_q["refusal_share"]) if top_q else "—",
            render.fmt(min(broken)) if broken else ("not broken" if att.get("attacks") else "—"),
            render.est(util.get("refusal_rate")), render.est(util.get("over_refusal")),
            render.est(util.get("utility_accuracy")), render.est(util.get("answer_nll")),
            render.est(util.get("kl_harmless"))]


def page(out: dict[str, Any]) -> tuple[list[render.Block], dict[str, bytes]]:
    """The report's blocks and figures from ``results.json``'s content (every number comes from it)."""
    models, cfg = out["models"], out["config"]
    names = [m["name"] for m in models]
    blocks: list[render.Block] = [
        ("h1", "Safety report: " + ", ".join(names)),
        ("p", f"Profile {cfg['profile']}. Held-out prompts: {out['data']['harmful']} (harmful); "
              f"{out['data']['harmless']} (harmless). Intervals at level {render.fmt(out['ci_level'])}: Wilson for rates "
              "(shares of prompts), bootstrap for AUROC, NLL and KL; paired differences resample the same prompts for "
              "both models."),
        ("h2", "Comparison"),
        ("table", ["model", "best probe AUROC", "TF-IDF AUROC", "refusal, direction ablated",
                   "refusal share, set-difference pruned (largest q)", "cheapest break (FLOPs)", "refusal rate",
                   "over-refusal", "arithmetic accuracy", "reference-answer NLL", "KL to the first model"],
         [_headline(m) for m in models]),
    ]
    if out.get("paired"):
        blocks += [("h2", f"Paired differences against {names[0]}"),
                   ("table", ["model", "refusal rate", "over-refusal", "arithmetic accuracy"],
                    [[name] + [render.est(d.get(k)) for k in ("refusal_rate", "over_refusal", "utility_accuracy")]
                     for name, d in out["paired"].items()])]
    figures: dict[str, bytes] = {}
    for name in cfg["sections"]:
        blocks += _section_blocks(name, models)
        if name in FIGURES:
            fname, plot, caption = FIGURES[name]
            figures[fname] = render.png(plot(models))
            blocks.append(("figure", fname, caption))
    return blocks, figures


_TITLES = {"harm": "Where harm is represented", "refusal": "What carries refusal",
           "weights": "Which weights are safety-critical", "attacks": "How brittle", "utility": "Utility"}


def _section_blocks(name: str, models: list[dict[str, Any]]) -> list[render.Block]:
    blocks: list[render.Block] = [("h2", _TITLES[name])]
    rows = []
    for m in models:
        sec = m["sections"].get(name) or {}
        if "skipped" in sec:
            blocks.append(("p", f"{m['name']}: not measured — {sec['skipped']}"))
            continue
        if name == "harm":
            comp = sec.get("best_vs_tfidf") or {}
            rows.append([m["name"], sec["best"]["method"], sec["best"]["layer"], render.est(sec["best"]["auroc"]),
                         render.est(sec["tfidf"]), render.est(comp.get("difference")), comp.get("verdict", "—")])
        elif name == "refusal":
            rows.append([m["name"], sec["layer"], sec["position"], render.fmt(sec["filtered"]), render.est(sec["refusal"]),
                         render.est(sec["refusal_ablated"]), render.est(sec["ablation_effect"]),
                         render.est(sec["over_refusal"]), render.est(sec["refusal_induced"]),
                         render.est(sec["induction_effect"])])
        elif name == "weights":
            rows += [[m["name"], p["method"], render.fmt(p["setting"]), render.fmt(p["sparsity"]),
                      render.est(p["refusal_share"]), render.est(p["answer_nll"])] for p in sec["points"]]
        elif name == "attacks":
            rows += [[m["name"], a, render.fmt(r["broken"]), f"{r['broken_trials']}/{r['trials']}", render.fmt(r["flops"]),
                      render.fmt(r["step"]), render.fmt(r["seconds"]), render.est(r["refusal_rate"])]
                     for a, r in sec["attacks"].items()]
        else:
            rows.append([m["name"]] + [render.est(sec.get(k)) for k in ("refusal_rate", "over_refusal",
                                                                         "utility_accuracy", "answer_nll",
                                                                         "kl_harmless")])
    header = {"harm": ["model", "best probe", "layer", "test AUROC", "TF-IDF AUROC", "difference (paired)", "verdict"],
              "refusal": ["model", "layer", "position", "prompts filtered", "refusal", "refusal, ablated", "change (paired)",
                          "over-refusal", "harmless refused, direction added", "change (paired)"],
              "weights": ["model", "method", "p = q", "sparsity", "refusal share", "reference-answer NLL"],
              "attacks": ["model", "attack", "broken", "broken trials", "FLOPs to break", "step", "seconds",
                          "refusal rate at the break"],
              "utility": ["model", "refusal rate", "over-refusal", "arithmetic accuracy", "reference-answer NLL",
                          "KL to the first model"]}[name]
    if rows:
        blocks.append(("table", header, rows))
    return blocks
