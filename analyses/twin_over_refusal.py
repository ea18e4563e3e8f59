"""Over-refusal of safety-tuned checkpoints on the 160 benign twins of the harmful TRAIN prompts.

VALIDATION has 66 harmless prompts, and the recipes of ``mechsafe align`` refuse only 1–5 of them, so it
separates recipes poorly and underestimated TEST over-refusal every time. The bundled twins
(``mechsafe.data.twin_prompts()``) keep a harmful prompt's form and framing around a harmless request:
a harder, larger over-refusal set that belongs to no evaluation split. It measures only recipes that do
not train on the twins (``--twin-prompts`` off, the default).

For each checkpoint: greedy responses of 48 new tokens (as ``mechsafe align``'s evaluation), refusals by
the phrase matcher, the over-refusal rate with its 95% bootstrap interval, overall and by form. Writes
``report.md``, ``results.json`` (every response) and ``run.json`` into ``runs/twin-over-refusal-<time>/``.

    python analyses/twin_over_refusal.py runs/trials/t23/model runs/trials/t24/model
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.evaluation import generate, is_refusal
from mechsafe.runs import atomic_dir, atomic_write_text, new_run_dir, write_json, write_run_manifest
from mechsafe.stats import Estimate, proportion, proportions_by


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model specs (mechsafe checkpoints that did not train on the twins)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--runs-dir", default="runs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    twins = ms.data.twin_prompts()
    forms = sorted({t["form"] for t in twins})
    results = {"n_prompts": len(twins), "models": []}
    for spec in args.models:
        t0 = time.perf_counter()
        model = ms.load_model(spec)
        mix = ms.models.model_info(model).extra.get("training_mix") or {}
        if mix.get("harmless", {}).get("twin_prompts"):
            raise MechsafeError(f"{spec} was trained on the twins; measure only checkpoints aligned without --twin-prompts")
        responses = generate(model, [t["text"] for t in twins], max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, progress=False)
        flags = [is_refusal(r) for r in responses]
        entry = {"model": spec, "over_refusal": proportion(flags).to_dict() | {"n": len(flags)},
                 "by_form": proportions_by(flags, [t["form"] for t in twins]),
                 "seconds": round(time.perf_counter() - t0, 1),
                 "samples": [{"id": t["id"], "form": t["form"], "response": r, "refused": x}
                             for t, r, x in zip(twins, responses, flags)]}
        results["models"].append(entry)
        print(f"{spec}: over-refusal {_fmt(entry['over_refusal'])}", flush=True)
    lines = [f"# Over-refusal on the {len(twins)} benign twins", "",
             f"Greedy, {args.max_new_tokens} new tokens, phrase matcher, 95% bootstrap intervals.", "",
             "| model | over-refusal | " + " | ".join(forms) + " |", "|---|---|" + "---|" * len(forms)]
    lines += [f"| {m['model']} | {_fmt(m['over_refusal'])} | " + " | ".join(_fmt(m["by_form"][f]) for f in forms) + " |"
              for m in results["models"]]
    report = "\n".join(lines) + "\n"
    run_dir = new_run_dir(args.runs_dir, "twin-over-refusal")
    with atomic_dir(run_dir) as tmp:
        write_json(tmp / "results.json", results)
        atomic_write_text(tmp / "report.md", report)
        write_run_manifest(tmp, command="analyses/twin_over_refusal.py", config=vars(args), seed=None, processing=None,
                           timings={m["model"]: m["seconds"] for m in results["models"]})
    print(report)
    print(f"run directory: {run_dir}")
    return 0


def _fmt(est: dict) -> str:
    return f"{Estimate.from_dict(est)} (n={est['n']})"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MechsafeError as exc:
        sys.exit(f"error: {exc}")
