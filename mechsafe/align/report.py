"""Base vs aligned evaluation of an align run and its markdown report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mechsafe.align.config import AlignConfig
from mechsafe.data import prompt_pool
from mechsafe.evaluation import evaluate
from mechsafe.forward import response_nll
from mechsafe.stats import Estimate, bootstrap, proportions_by


def evaluate_pair(base, aligned, config: AlignConfig, progress: bool = True) -> dict[str, Any]:
    """Base vs aligned metrics on the held-out split (see the module docstring)."""
    harmful = prompt_pool("harmful", config.eval_split, config.eval_limit, config.seed)
    harmless = prompt_pool("harmless", config.eval_split, config.eval_limit, config.seed)
    kw = dict(max_new_tokens=config.eval_max_new_tokens, batch_size=config.generate_batch_size,
              utility=config.utility, progress=progress, seed=config.seed)
    out: dict[str, Any] = {"split": config.eval_split}
    results = {}
    for name, model, ref in (("aligned", aligned, base), ("base", base, None)):
        t0 = time.perf_counter()
        res = evaluate(model, [p["text"] for p in harmful], [p["text"] for p in harmless], reference_model=ref, **kw)
        results[name] = res
        flags_h = [s["refused"] for s in res.samples if s["set"] == "harmful"]
        flags_s = [s["refused"] for s in res.samples if s["set"] == "harmless"]
        out[name] = res.to_dict(samples=True) | {
            "refusal_by_form": proportions_by(flags_h, [p["form"] for p in harmful]),
            "over_refusal_by_form": proportions_by(flags_s, [p["form"] for p in harmless]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    # NLL of the base model's own answers to the held-out harmless prompts, under both models
    base_resp = [(s["prompt"], s["response"].strip()) for s in results["base"].samples
                 if s["set"] == "harmless" and s["response"].strip()]
    if base_resp:
        nll_base = response_nll(base, base_resp, batch_size=config.generate_batch_size)
        nll_aligned = response_nll(aligned, base_resp, batch_size=config.generate_batch_size)
        diff = (nll_aligned - nll_base).numpy()
        out["harmless_base_answer_nll"] = {
            "base": float(nll_base.mean()), "aligned": float(nll_aligned.mean()),
            "change": bootstrap(lambda d: float(np.mean(d)), diff, seed=config.seed).to_dict(), "n": len(base_resp)}
    return out


def _fmt(est: dict[str, float] | None) -> str:
    if not est:
        return "n/a"
    return str(Estimate.from_dict(est))


def report_markdown(evaluation: dict[str, Any], mix: dict[str, Any], timings: dict[str, float], model_path: Path) -> str:
    """The markdown report of an align run."""
    b, a = evaluation["base"], evaluation["aligned"]
    lines = [f"# mechsafe align — base vs aligned on the {evaluation['split']} split", "",
             f"Aligned checkpoint: `{model_path}`", "",
             "| metric | base | aligned |", "|---|---|---|"]
    for name in ("refusal_rate", "over_refusal", "utility_accuracy", "answer_nll", "kl_harmless"):
        lines.append(f"| {name} | {_fmt(b.get(name))} | {_fmt(a.get(name))} |")
    for key, label in (("refusal_by_form", "refusal_rate"), ("over_refusal_by_form", "over_refusal")):
        for form in sorted(a[key]):
            lines.append(f"| {label} ({form}, n={a[key][form]['n']}) | {_fmt(b[key][form])} | {_fmt(a[key][form])} |")
    nll = evaluation.get("harmless_base_answer_nll")
    if nll:
        lines.append(f"| NLL of base answers to held-out harmless prompts (n={nll['n']}) | {nll['base']:.3f} | "
                     f"{nll['aligned']:.3f} (change {_fmt(nll['change'])}) |")
    lines += ["", f"n harmful = {a['n_harmful']}, n harmless = {a['n_harmless']}; intervals: 95% (Wilson for rates, bootstrap otherwise).", "",
              "Training mix: " + ", ".join(f"{k}={v}" for k, v in mix.items()), "",
              "Timings (s): " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()), ""]
    return "\n".join(lines)
