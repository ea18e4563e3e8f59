"""Compare ``mechsafe align`` recipes on the bundled confirmation prompts, which no model saw before.

VALIDATION (57 harmful, 66 harmless prompts) could not separate the recipes near the recorded one, and a
difference seen on TEST after the selection can suggest a hypothesis but not confirm it. The confirmation
prompts (``mechsafe.data.confirmation_prompts()``) were written and frozen after every recipe had been tried,
so a comparison on them is a fresh test.

A recipe is a name and the checkpoints of its seeds. For every checkpoint: greedy responses of 48 new tokens
to every confirmation prompt (as ``mechsafe align``'s evaluation), refusals by the phrase matcher. Per recipe:
the refusal rate of the harmful prompts and the over-refusal rate of the harmless ones, each prompt counted as
its mean over the seeds, with 95% bootstrap intervals, by form and per seed. The first recipe is compared with
each other one: D = (refusal - over-refusal)[first] - (refusal - over-refusal)[other], with a paired bootstrap
interval (prompts resampled within each kind, the same draws for both recipes). Writes ``report.md``,
``results.json`` (every response) and ``run.json`` into ``runs/confirmation-set-<time>/``.

    python analyses/confirmation_set.py \\
        --recipe t41=runs/trials/t41/model,runs/trials/t42/model,runs/trials/t43/model \\
        --recipe t32=runs/trials/t66/model,runs/trials/t67/model,runs/trials/t68/model
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.evaluation import generate, refusal_flags
from mechsafe.runs import atomic_dir, atomic_write_text, new_run_dir, write_json, write_run_manifest
from mechsafe.stats import Estimate, bootstrap, proportion

KINDS = ("harmful", "harmless")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", required=True, metavar="NAME=MODEL[,MODEL...]",
                   help="a recipe and its checkpoints, one per seed (give two or more recipes to compare them)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="use only the first N prompts of each kind (for quick checks)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap draws of the paired comparison")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--runs-dir", default="runs")
    return p.parse_args(argv)


def parse_recipes(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=a,b,c`` strings as {name: [checkpoints]}, in the order given."""
    recipes: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, models = spec.partition("=")
        paths = [m for m in models.split(",") if m]
        if not sep or not name or not paths:
            raise MechsafeError(f"--recipe {spec!r} is not NAME=MODEL[,MODEL...]; e.g. --recipe t41=runs/trials/t41/model")
        if name in recipes:
            raise MechsafeError(f"recipe {name!r} is given twice; give each recipe once, with all its checkpoints")
        recipes[name] = paths
    return recipes


def rates(flags: np.ndarray, kinds: np.ndarray, forms: np.ndarray) -> dict:
    """Refusal and over-refusal of per-prompt refusal values (0/1, or a mean over seeds), overall and by form."""
    out = {}
    for kind, key in zip(KINDS, ("refusal", "over_refusal")):
        sel = kinds == kind
        out[key] = proportion(flags[sel]).to_dict() | {"n": int(sel.sum())}
        out[f"{key}_by_form"] = {f: proportion(flags[sel & (forms == f)]).to_dict() | {"n": int((sel & (forms == f)).sum())}
                                 for f in sorted(set(forms[sel].tolist()))}
    return out


def gap_difference(a: np.ndarray, b: np.ndarray, kinds: np.ndarray, n_boot: int) -> dict:
    """D = (refusal - over-refusal) of ``a`` minus that of ``b`` (per-prompt values, same prompts), with a paired
    bootstrap interval that resamples prompts within each kind, and its two parts."""
    harmful = (kinds == "harmful").astype(int)

    def part(x, y, h, kind):
        return (x[h == kind] - y[h == kind]).mean()

    def d(x, y, h):
        return part(x, y, h, 1) - part(x, y, h, 0)

    boot = dict(n_boot=n_boot, stratify=harmful)
    return {"D": bootstrap(d, a, b, harmful, **boot).to_dict(),
            "refusal_difference": bootstrap(lambda x, y, h: part(x, y, h, 1), a, b, harmful, **boot).to_dict(),
            "over_refusal_difference": bootstrap(lambda x, y, h: part(x, y, h, 0), a, b, harmful, **boot).to_dict()}


def main(argv=None) -> int:
    args = parse_args(argv)
    recipes = parse_recipes(args.recipe)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = ms.data.confirmation_prompts()
    if args.limit:
        prompts = [p for kind in KINDS for p in [q for q in prompts if q["kind"] == kind][:args.limit]]
    kinds = np.array([p["kind"] for p in prompts])
    forms = np.array([p["form"] for p in prompts])
    results = {"n_prompts": {k: int((kinds == k).sum()) for k in KINDS}, "recipes": []}
    timings = {}
    for name, specs in recipes.items():
        seeds = []
        for spec in specs:
            t0 = time.perf_counter()
            model = ms.load_model(spec)
            responses = generate(model, [p["text"] for p in prompts], max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, progress=False)
            flags = refusal_flags(responses).astype(float)
            timings[spec] = round(time.perf_counter() - t0, 1)
            seeds.append({"model": spec, **rates(flags, kinds, forms),
                          "samples": [{"id": p["id"], "response": r, "refused": bool(x)}
                                      for p, r, x in zip(prompts, responses, flags)]})
            print(f"{name} {spec}: refusal {_fmt(seeds[-1]['refusal'])}, over-refusal "
                  f"{_fmt(seeds[-1]['over_refusal'])}", flush=True)
            del model
        mean = np.mean([[s["refused"] for s in seed["samples"]] for seed in seeds], axis=0)
        results["recipes"].append({"name": name, "seeds": seeds, **rates(mean, kinds, forms),
                                   "per_prompt_refusal": mean.tolist()})
    first, *others = results["recipes"]
    results["comparisons"] = [
        {"first": first["name"], "other": o["name"],
         **gap_difference(np.array(first["per_prompt_refusal"]), np.array(o["per_prompt_refusal"]), kinds, args.n_boot)}
        for o in others]
    report = _report(results, args)
    run_dir = new_run_dir(args.runs_dir, "confirmation-set")
    with atomic_dir(run_dir) as tmp:
        write_json(tmp / "results.json", results)
        atomic_write_text(tmp / "report.md", report)
        write_run_manifest(tmp, command="analyses/confirmation_set.py", config=vars(args), seed=None, processing=None,
                           timings=timings)
    print(report)
    print(f"run directory: {run_dir}")
    return 0


def _report(results: dict, args: argparse.Namespace) -> str:
    n = results["n_prompts"]
    lines = [f"# Recipes on the confirmation prompts ({n['harmful']} harmful, {n['harmless']} harmless)", "",
             f"Greedy, {args.max_new_tokens} new tokens, phrase matcher, 95% bootstrap intervals; a recipe's rate "
             "counts each prompt as its mean over the recipe's seeds.", "",
             "| recipe / seed | refusal, harmful | question / instruction | over-refusal, harmless | question / instruction |",
             "|---|---|---|---|---|"]
    for r in results["recipes"]:
        for row, label in [(r, f"**{r['name']}** (mean of {len(r['seeds'])})")] + [(s, f"{r['name']}: {s['model']}")
                                                                                     for s in r["seeds"]]:
            cells = []
            for key in ("refusal", "over_refusal"):
                by_form = row[f"{key}_by_form"]
                cells += [_fmt(row[key]), " / ".join(f"{by_form[f]['value']:.3f}" for f in ("question", "instruction")
                                                     if f in by_form)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for c in results["comparisons"]:
        lines += ["", f"**{c['first']} against {c['other']}** (paired bootstrap, {args.n_boot} draws, prompts resampled "
                  "within each kind): D = (refusal - over-refusal) difference "
                  f"{Estimate.from_dict(c['D'])}; refusal difference {Estimate.from_dict(c['refusal_difference'])}; "
                  f"over-refusal difference {Estimate.from_dict(c['over_refusal_difference'])}."]
    return "\n".join(lines) + "\n"


def _fmt(est: dict) -> str:
    return f"{Estimate.from_dict(est)} (n={est['n']})"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MechsafeError as exc:
        sys.exit(f"error: {exc}")
