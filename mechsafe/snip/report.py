"""The pruning study's report: figures, table and verdict, all from the study's own numbers."""

from __future__ import annotations

from typing import Any

from mechsafe.snip.study import RANK_METHODS, SPARSITY_METHODS

STYLE = {"top-safety": ("tab:red", "o"), "top-utility": ("tab:blue", "s"), "set-difference": ("tab:purple", "D"),
         "random": ("tab:gray", "x"), "actsvd": ("tab:green", "o"), "actsvd-orthogonal": ("tab:olive", "D")}
PANELS = (("refusal_rate", "refusal rate (harmful)"), ("over_refusal", "over-refusal (harmless)"),
          ("answer_nll", "reference-answer NLL"), ("utility_accuracy", "arithmetic accuracy"))


def plot_study(result: dict[str, Any]):
    """Refusal, over-refusal and utility against sparsity (top row) and against removed rank (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    base = next(p for p in points if p["method"] == "none")
    fig, axes = plt.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 7.5))
    for row, (methods, x_of, xlabel) in enumerate((
            (SPARSITY_METHODS, lambda p: 100 * p["sparsity"], "pruned weights (% of scored weights)"),
            (RANK_METHODS, lambda p: p["rank"], "safety rank removed per weight"))):
        for ax, (metric, title) in zip(axes[row], PANELS):
            for method in methods:
                pts = sorted((p for p in points if p["method"] == method), key=x_of)
                if not pts:
                    continue
                xs = [x_of(p) for p in pts]
                ys = [p[metric]["value"] for p in pts]
                err = [[y - p[metric]["low"] for y, p in zip(ys, pts)], [p[metric]["high"] - y for y, p in zip(ys, pts)]]
                color, marker = STYLE[method]
                ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, ms=4, capsize=2, label=method)
            ax.axhline(base[metric]["value"], color="black", ls="--", lw=0.8, label="unpruned")
            ax.set_xscale("log", base=2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
        axes[row][0].legend(fontsize=7)
    fig.suptitle(f"Pruning study of {result['model']['spec']} ({result['n_harmful']} harmful / "
                 f"{result['n_harmless']} harmless held-out prompts; bars: 95% intervals)", fontsize=11)
    fig.tight_layout()
    return fig


def _est(d: dict[str, float]) -> str:
    return f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def study_table(result: dict[str, Any]) -> str:
    rows = ["| method | setting | sparsity | refusal rate | over-refusal | arithmetic accuracy | answer NLL | "
            "KL (harmless) | refusal score |", "|---|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        setting = {"none": "", "set-difference": f"p=q={p['setting']:g}", "random": f"matched to p=q={p['setting']:g}"}
        label = setting.get(p["method"], f"r={p['rank']}" if p["rank"] else f"{p['setting']:.2%}")
        sparsity = "" if p["sparsity"] is None else f"{p['sparsity']:.2%}"
        rows.append(f"| {p['method']} | {label} | {sparsity} | {_est(p['refusal_rate'])} | {_est(p['over_refusal'])} | "
                    f"{_est(p['utility_accuracy'])} | {_est(p['answer_nll'])} | {p['kl_harmless']['value']:.4f} | "
                    f"{p['refusal_score']:.2f} |")
    return "\n".join(rows)


def verdict_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for c in result["verdict"]["claims"]:
        word = {True: "holds", False: "does not hold", None: "not tested"}[c["holds"]]
        out.append(f"- **{c['claim']}: {word} here.** Rule: {c['rule']}. Measured: {c['evidence'] or 'no points'}.")
    return out


def study_markdown(result: dict[str, Any], figure: str = "pruning.png") -> str:
    s, u = result["scores"]["safety"], result["scores"]["utility"]
    cfg = result["config"]
    lines = [f"# Pruning study: `{result['model']['spec']}`", "",
             f"Weights scored: {result['n_weights']:,} ({', '.join(result['kinds'])} of every block). Safety scores: "
             f"{s['description']}, first {s['config']['short_tokens']} response tokens (safety-short). Utility scores: "
             f"{u['description']}. Evaluation: {result['n_harmful']} held-out harmful and {result['n_harmless']} "
             f"harmless prompts, {cfg['max_new_tokens']} generated tokens, refusal by the phrase matcher.", "",
             "## Verdict", "", *verdict_lines(result), "", f"![pruning study]({figure})", "", "## All points", "",
             study_table(result), ""]
    return "\n".join(lines)
