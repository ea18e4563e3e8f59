"""The probe benchmark's artifacts: ``report.md``, ``results.json`` and figures.

The report states the setup, the data counts, each method's best layer (selected on validation,
reported on test), the comparison with the baselines in plain words, the full per-layer table and
the saved probes. Figures use matplotlib's ``Figure`` object directly (Agg canvas, no global
backend switch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from mechsafe.data import SPLITS
from mechsafe.probes.evaluate import CandidateResult, Comparison, best_overall, label
from mechsafe.runs import atomic_write_text, write_json
from mechsafe.stats import Estimate

if TYPE_CHECKING:
    from mechsafe.probes.bench import BenchResult

METRIC_NAMES = {"auroc": "AUROC", "accuracy": "accuracy", "f1": "F1"}
LAYER_FIGURE = "metric_by_layer.png"
CONFUSION_FIGURE = "confusion_matrix.png"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _est(e: Estimate) -> str:
    return f"{_fmt(e.value)} [{_fmt(e.low)}, {_fmt(e.high)}]"


def _c(c: float | None) -> str:
    return "–" if c is None else f"{c:g}"


def _layer(r: CandidateResult) -> str:
    return "–" if r.layer is None else str(r.layer)


def _f1_name(result: "BenchResult") -> str:
    return "F1" if len(result.label_names) == 2 else "macro F1"


def comparison_sentence(c: Comparison) -> str:
    """One comparison in plain words."""
    diff = c.difference
    paired = (f"paired bootstrap difference {_est(diff)}, "
              + ("which excludes 0" if diff.low > 0 or diff.high < 0 else "which includes 0"))
    a, b, m = c.a, c.b, METRIC_NAMES[c.metric]
    if b.startswith("tfidf"):
        if c.verdict == "better":
            return (f"**{a} beats the TF-IDF baseline.** Test {m} {_est(c.a_value)} against TF-IDF's "
                    f"{_est(c.b_value)} ({paired}): the activations separate the classes better than the prompt's "
                    "words alone.")
        if c.verdict == "worse":
            return (f"**{a} is worse than the TF-IDF baseline.** Test {m} {_est(c.a_value)} against TF-IDF's "
                    f"{_est(c.b_value)} ({paired}): the words alone separate the classes better, so this probe is "
                    "not evidence of a representation.")
        return (f"**{a} does not beat the TF-IDF baseline.** Test {m} {_est(c.a_value)} against TF-IDF's "
                f"{_est(c.b_value)} ({paired}). On this data a probe at this level is not evidence of a "
                "representation beyond the surface words.")
    if b.startswith("majority"):
        if c.verdict == "better":
            return (f"{a} beats the majority-class baseline: test {m} {_est(c.a_value)} against "
                    f"{_est(c.b_value)}.")
        return (f"{a} does not beat the majority-class baseline (test {m} {_est(c.a_value)} against "
                f"{_est(c.b_value)}): it has learned nothing usable.")
    word = {"better": "beats", "worse": "is worse than", "tie": "is not distinguishable from"}[c.verdict]
    return f"{a} {word} {b}: test {m} {_est(c.a_value)} against {_est(c.b_value)} ({paired})."


def summary_lines(result: "BenchResult") -> list[str]:
    """A short fixed-width table of each method's best layer, for the CLI to print."""
    head = f"{'method':<16}{'layer':>6}{'val AUROC':>11}  {'test AUROC [95% CI]':<24}{'test acc [95% CI]':<24}"
    lines = [head, "-" * len(head)]
    for m, r in result.best.items():
        lines.append(f"{m:<16}{_layer(r):>6}{_fmt(r.val['auroc']):>11}  {_est(r.test['auroc']):<24}"
                     f"{_est(r.test['accuracy']):<24}")
    return lines


def render_markdown(result: "BenchResult") -> str:
    """The full ``report.md``."""
    cfg, data = result.config, result.data
    lvl = int(round(cfg.ci_level * 100))
    f1n = _f1_name(result)
    layers = sorted({r.layer for r in result.results if r.layer is not None})
    out = [f"# Probe benchmark: {cfg.name or data['name']}", ""]
    out.append(f"Model `{result.model['spec']}` ({result.model['source']}, weight processing "
               f"`{result.model['processing']}`); hook kind `{cfg.hook}` at {len(layers)} layers "
               f"({cfg.layers}); pooling {', '.join(cfg.pooling)}; data `{data['name']}` (fingerprint "
               f"`{data['fingerprint']}`, {data['mode']}); seed {cfg.seed}.")
    out.append("")
    out.append(f"Each dense probe standardizes the pooled activations and fits an L2 logistic regression whose C "
               f"is chosen by {cfg.cv_folds}-fold stratified cross-validation on the training rows from "
               f"{{{', '.join(f'{c:g}' for c in cfg.cs)}}}. Each method's best layer is chosen by validation "
               f"{METRIC_NAMES[cfg.select_by]}; test metrics carry {lvl}% stratified percentile-bootstrap "
               f"intervals ({cfg.n_boot} resamples). Baselines: majority class, and TF-IDF (word 1-2 grams) + "
               "logistic regression on the raw prompt text, which never sees the model.")
    out += ["", "## Data", ""]
    names = data["label_names"]
    out.append("| split | " + " | ".join(names) + " | total |")
    out.append("|---|" + "---:|" * (len(names) + 1))
    for s in SPLITS:
        counts = data[s]
        out.append(f"| {s} | " + " | ".join(str(counts[n]) for n in names) + f" | {sum(counts.values())} |")
    if data["mode"] != "in-distribution":
        out.append("")
        out.append("Out-of-distribution split — groups per split:")
        out.append("")
        for s in SPLITS:
            groups = ", ".join(f"{g} {n}" for g, n in data[f"{s}_groups"].items())
            out.append(f"- {s}: {groups}")
    out += ["", "## Best layer per method (selected on validation, reported on test)", ""]
    out.append(f"| method | best layer | val AUROC | test AUROC [{lvl}% CI] | test accuracy [{lvl}% CI] | "
               f"test {f1n} [{lvl}% CI] | C |")
    out.append("|---|---:|---:|---|---|---|---:|")
    for m, r in result.best.items():
        out.append(f"| {m} | {_layer(r)} | {_fmt(r.val['auroc'])} | {_est(r.test['auroc'])} | "
                   f"{_est(r.test['accuracy'])} | {_est(r.test['f1'])} | {_c(r.c)} |")
    out += ["", "## Does the probe beat the baselines?", ""]
    if result.comparisons:
        out += [f"- {comparison_sentence(c)}" for c in result.comparisons]
    else:
        out.append("- No comparison: the run has no model-based method or no baseline.")
    out.append("")
    out.append("Rule: both methods are scored on the same test prompts, so a method *beats* another when the "
               "paired bootstrap interval of their difference lies above 0; an interval holding 0 means this data "
               "cannot tell them apart.")
    out += ["", "## All layers", ""]
    out.append(f"| method | layer | val AUROC | test AUROC [{lvl}% CI] | test accuracy [{lvl}% CI] | "
               f"test {f1n} [{lvl}% CI] | C |")
    out.append("|---|---:|---:|---|---|---|---:|")
    for r in sorted(result.results, key=lambda r: (r.method, -1 if r.layer is None else r.layer)):
        star = " ★" if result.best.get(r.method) is r else ""
        out.append(f"| {r.method}{star} | {_layer(r)} | {_fmt(r.val['auroc'])} | {_est(r.test['auroc'])} | "
                   f"{_est(r.test['accuracy'])} | {_est(r.test['f1'])} | {_c(r.c)} |")
    out += ["", "★ = the method's best layer on validation.", "", "## Figures", ""]
    out.append(f"![test AUROC by layer]({LAYER_FIGURE})")
    top = best_overall(result.best, cfg.select_by, model_based=False)
    if top is not None:
        out += ["", f"![confusion matrix of {label(top)}]({CONFUSION_FIGURE})"]
    if result.probes:
        out += ["", "## Saved probes", ""]
        for m, fname in result.probes.items():
            r = result.best[m]
            out.append(f"- `{fname}` ({m}, layer {r.layer}, C {_c(r.c)}) with sidecar `{Path(fname).with_suffix('.json')}`")
        out += ["", "Score new prompts with the model recorded in the sidecar:", "", "```",
                f"mechsafe probe-score {result.run_dir or '.'}/{result.best_probe} \"How do I bake bread?\"", "```"]
    out += ["", "## Timings (seconds)", ""]
    out += [f"- {k}: {v:.1f}" for k, v in result.timings.items()]
    return "\n".join(out) + "\n"


def plot_layers(result: "BenchResult", path: Path, metric: str = "auroc") -> Path:
    """Test ``metric`` by layer with interval bands, one line per layered method, baselines as bands."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(r.method for r in result.results))
    for i, m in enumerate(methods):
        rows = sorted((r for r in result.results if r.method == m), key=lambda r: r.layer or 0)
        color = f"C{i % 10}"
        if rows[0].layer is None:
            e = rows[0].test[metric]
            ax.axhline(e.value, color=color, ls="--", lw=1.2, label=f"{m} (no layer)")
            ax.axhspan(e.low, e.high, color=color, alpha=0.12)
            continue
        x = [r.layer for r in rows]
        ax.plot(x, [r.test[metric].value for r in rows], color=color, lw=1.5, marker=".", label=m)
        ax.fill_between(x, [r.test[metric].low for r in rows], [r.test[metric].high for r in rows], color=color,
                        alpha=0.2)
        b = result.best.get(m)
        if b is not None:
            ax.plot([b.layer], [b.test[metric].value], marker="*", ms=12, color=color, mec="black")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"test {METRIC_NAMES[metric]} ({int(round(result.config.ci_level * 100))}% CI band)")
    ax.set_title(f"{result.config.name or result.data['name']}: {result.config.hook} probes (★ best on validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_confusion(result: "BenchResult", r: CandidateResult, path: Path) -> Path:
    """Test confusion matrix of one candidate (counts, rows = true class)."""
    import numpy as np
    from matplotlib.figure import Figure

    cm = np.asarray(r.confusion)
    names = result.label_names
    size = 3.2 + 0.6 * len(names)
    fig = Figure(figsize=(size, size * 0.85), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{label(r)} (test)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_artifacts(result: "BenchResult", folder: Path) -> None:
    """Write ``results.json``, the figures and, last, ``report.md`` into ``folder``."""
    folder = Path(folder)
    write_json(folder / "results.json", result.to_dict())
    plot_layers(result, folder / LAYER_FIGURE)
    top = best_overall(result.best, result.config.select_by, model_based=False)
    if top is not None:
        plot_confusion(result, top, folder / CONFUSION_FIGURE)
    atomic_write_text(folder / "report.md", render_markdown(result))
