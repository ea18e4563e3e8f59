"""Wei et al.'s pruning study on one model, with the overlap of safety- and utility-critical weights.

Runs the pruning study of ``mechsafe prune-study`` (:func:`mechsafe.snip.study.run_study`: SNIP top safety, top
utility, set difference with ``p = q`` swept, matched random groups and ActSVD, each evaluated on held-out prompts
and undone) and adds the paper's separability check: per block and weight kind, the Jaccard index of the top
``--overlap-fraction`` weights by safety score and by utility score. A low index means the weights that matter
for refusal are mostly not the ones that matter for utility, which is what makes the set difference possible.

Writes ``report.md``, ``pruning.png``, ``overlap.png``, ``results.json`` and ``run.json`` into
``runs/safety-pruning-<time>/``.

    python analyses/safety_pruning.py [--model smollm2-135m-aligned] [--overlap-fraction 0.03] [study flags]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.runs import start_run
from mechsafe.snip import ScoreConfig, StudyConfig, score, top_mask
from mechsafe.snip.report import plot_study, study_markdown
from mechsafe.snip.study import run_study


def parse_args(argv=None) -> tuple[argparse.Namespace, StudyConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-aligned")
    p.add_argument("--harmful", default="harmful", help="held-out harmful prompts (suite: its test split, or a file)")
    p.add_argument("--harmless", default="harmless", help="held-out harmless prompts (suite: its test split, or a file)")
    p.add_argument("--overlap-fraction", type=float, default=0.03, help="share of each module compared (default: 0.03)")
    p.add_argument("--scores-dir", help="SNIP score stores and study points (default: $MECHSAFE_CACHE/snip)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(StudyConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f"study_{f.name}", help="a StudyConfig field")
    args = p.parse_args(argv)
    from mechsafe.cli.common import config_values

    values = config_values(StudyConfig, argparse.Namespace(**{k[6:]: v for k, v in vars(args).items()
                                                              if k.startswith("study_") and v is not None}))
    return args, StudyConfig(**values)


def overlap(model, config: StudyConfig, fraction: float, root) -> dict[str, dict[str, float]]:
    """Jaccard index of the top ``fraction`` by safety-short and by utility score, per block and weight kind."""
    safety = score(model, ScoreConfig(data="safety-short", responses=config.responses), root, progress=False)
    utility = score(model, ScoreConfig(data="utility", responses=config.responses), root, progress=False)
    out: dict[str, dict[str, float]] = {}
    for layer in safety.layers:
        s_layer, u_layer = safety.layer(layer), utility.layer(layer)
        for kind, s in s_layer.items():
            a, b = top_mask(s, fraction), top_mask(u_layer[kind], fraction)
            out.setdefault(kind, {})[str(layer)] = float((a & b).sum()) / max(1, int((a | b).sum()))
    return out


def plot_overlap(jaccard: dict[str, dict[str, float]], fraction: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for kind, by_layer in jaccard.items():
        layers = sorted(by_layer, key=int)
        ax.plot([int(x) for x in layers], [by_layer[x] for x in layers], marker=".", label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("Jaccard index")
    ax.set_title(f"Overlap of the top {fraction:.0%} weights by safety and by utility score", fontsize=10)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    args, config = parse_args(argv)
    if not 0 < args.overlap_fraction < 1:
        raise MechsafeError(f"--overlap-fraction {args.overlap_fraction} is not in (0, 1); pass e.g. 0.03")
    sets = {kind: ms.data.load_texts(getattr(args, kind), "test") for kind in ("harmful", "harmless")}
    model = ms.load_model(args.model, processing="none")
    result = run_study(model, sets["harmful"][0], sets["harmless"][0], config, root=args.scores_dir,
                       progress=not args.no_progress)
    result["data"] = {kind: where for kind, (_, where) in sets.items()}
    jaccard = overlap(model, config, args.overlap_fraction, args.scores_dir)
    result["overlap"] = {"fraction": args.overlap_fraction, "jaccard": jaccard}
    values = [v for by_layer in jaccard.values() for v in by_layer.values()]
    with start_run(args.runs_dir, "analyses/safety_pruning.py", name="safety-pruning", config=result["config"],
                   seed=config.seed, processing="none") as run:
        run.figure("pruning.png", plot_study(result))
        run.figure("overlap.png", plot_overlap(jaccard, args.overlap_fraction))
        run.write_json("results.json", result)
        run.write_text("report.md", study_markdown(result) + "\n".join([
            "## Overlap of safety- and utility-critical weights", "",
            f"Jaccard index of the top {args.overlap_fraction:.0%} of each module by safety-short and by utility score: "
            f"median {np.median(values):.3f}, range {min(values):.3f}-{max(values):.3f} over {len(values)} modules "
            f"(independent random choices would give {args.overlap_fraction / (2 - args.overlap_fraction):.3f}).", "",
            "![overlap](overlap.png)", ""]))
        run.timings.update(result["timings_s"])
        run.extra.update({"model": result["model"], "data": result["data"]})
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MechsafeError as exc:
        sys.exit(f"error: {exc}")
