"""Agreement of a judge model (``mechsafe.evaluation.ModelJudge``) with the phrase matcher on saved responses.

Reads the generated responses of a finished run: a ``mechsafe eval`` run directory (``samples.jsonl``) or a
``mechsafe align`` run directory (``eval.json``, both models). Each harmful and harmless response is judged
once by the judge model (one forward pass per response, no generation). The script reports, per set, the refusal
rate by each method with its 95% bootstrap interval, the 2×2 table of the two methods, their raw agreement,
Cohen's kappa, and the AUROC of the judge's score (log p(Yes) − log p(No)) against the matcher's flags, which
does not depend on the judge's threshold. Writes ``report.md``, ``results.json`` (every response with its judge score) and ``run.json`` into
``runs/judge-agreement-<time>/``.

    python analyses/judge_agreement.py runs/align-final9 --judge-model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.evaluation import ModelJudge
from mechsafe.runs import start_run
from mechsafe.stats import proportion

SETS = ("harmful", "harmless")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a mechsafe eval or mechsafe align run directory")
    p.add_argument("--judge-model", default="smollm2-135m-instruct", help="judge model spec (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--runs-dir", default="runs")
    return p.parse_args(argv)


def load_samples(run: Path) -> dict[str, list[dict]]:
    """The harmful and harmless samples of each evaluated model in ``run``, by model name."""
    if (run / "samples.jsonl").is_file():
        rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line.strip()]
        by_model = {"model": rows}
    elif (run / "eval.json").is_file():
        data = json.loads((run / "eval.json").read_text())
        by_model = {name: data[name]["samples"] for name in ("base", "aligned") if name in data}
    else:
        raise MechsafeError(f"{run} has neither samples.jsonl nor eval.json; pass a mechsafe eval or align run directory")
    out = {name: [s for s in rows if s.get("set") in SETS] for name, rows in by_model.items()}
    if not any(out.values()):
        raise MechsafeError(f"{run} holds no harmful or harmless responses to judge")
    return out


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two boolean ratings (``None`` when chance agreement is 1, e.g. both constant)."""
    observed = float(np.mean(a == b))
    chance = float(np.mean(a) * np.mean(b) + (1 - np.mean(a)) * (1 - np.mean(b)))
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def compare(matcher: np.ndarray, judge: np.ndarray, score: np.ndarray) -> dict:
    """Both methods' refusal rates, their 2×2 table and agreement, and the AUROC of the judge's score."""
    return {"n": int(len(matcher)), "matcher": proportion(matcher).to_dict(), "judge": proportion(judge).to_dict(),
            "both": int(np.sum(matcher & judge)), "matcher_only": int(np.sum(matcher & ~judge)),
            "judge_only": int(np.sum(~matcher & judge)), "neither": int(np.sum(~matcher & ~judge)),
            "agreement": float(np.mean(matcher == judge)), "kappa": cohen_kappa(matcher, judge),
            "auroc": float(roc_auc_score(matcher, score)) if 0 < matcher.sum() < len(matcher) else None}


def report(args: argparse.Namespace, results: dict) -> str:
    lines = [f"# Judge agreement: `{args.judge_model}` vs the phrase matcher", "",
             f"Responses of `{args.run}`; a response is a refusal for the judge when its answer to "
             "`mechsafe.evaluation.JUDGE_QUESTION` starts more likely with Yes than No.", "",
             "| model | set | n | matcher refusal [95% CI] | judge refusal [95% CI] | both / matcher only / judge only / "
             "neither | agreement | kappa | AUROC of the judge score |", "|---|---|---|---|---|---|---|---|---|"]
    for name, sets in results["models"].items():
        for set_name, c in sets.items():
            m, j = c["matcher"], c["judge"]
            kappa, auroc = ("—" if c[k] is None else f"{round(c[k], 2) + 0.0:.2f}" for k in ("kappa", "auroc"))
            lines.append(f"| {name} | {set_name} | {c['n']} | {m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}] | "
                         f"{j['value']:.3f} [{j['low']:.3f}, {j['high']:.3f}] | {c['both']} / {c['matcher_only']} / "
                         f"{c['judge_only']} / {c['neither']} | {c['agreement']:.3f} | {kappa} | {auroc} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = load_samples(Path(args.run))
    t0 = time.perf_counter()
    judge = ModelJudge(ms.load_model(args.judge_model, processing="none"), batch_size=args.batch_size)
    results: dict = {"judge_model": args.judge_model, "models": {}, "samples": {}}
    for name, rows in samples.items():
        scores = judge.scores([s["prompt"] for s in rows], [s["response"] for s in rows])
        flags = scores > 0  # ModelJudge.flags' rule, applied to the scores already computed
        matcher = np.array([bool(s["refused"]) for s in rows])
        sets = np.array([s["set"] for s in rows])
        results["samples"][name] = [{"set": s["set"], "prompt": s["prompt"], "response": s["response"],
                                     "matcher": bool(m), "judge_score": float(x), "judge": bool(f)}
                                    for s, m, x, f in zip(rows, matcher, scores, flags)]
        results["models"][name] = {set_name: compare(matcher[sets == set_name], flags[sets == set_name],
                                                     scores[sets == set_name])
                                   for set_name in SETS if (sets == set_name).any()}
    seconds = time.perf_counter() - t0
    text = report(args, results)
    with start_run(args.runs_dir, "analyses/judge_agreement.py", name="judge-agreement", config=vars(args), seed=0,
                   processing="none") as run:
        run.write_json("results.json", results)
        run.write_text("report.md", text)
        run.timings["judge"] = seconds
    print(text)
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MechsafeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
