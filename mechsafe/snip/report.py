"""The pruning study's report: figures, table and verdict, all from the study's own numbers."""

from __future__ import annotations

from typing import Any

from mechsafe.snip.study import RANK_METHODS, SPARSITY_METHODS

STYLE = {"top-safety": ("tab:red", "o"), "top-utility": ("tab:blue", "s"), "set-difference": ("tab:purple", "D"),
         "random": ("tab:gray", "x"), "actsvd": ("tab:green", "o"), "actsvd-orthogonal": ("tab:olive", "D")}
PANELS = (("refusal_share", "refusal share (fast; ★ = generation)"), ("answer_nll", "reference-answer NLL"),
          ("kl_first_token", "KL of the first response token (harmless)"))


def _y(point: dict[str, Any], metric: str) -> float:
    v = point[metric]
    return v["value"] if isinstance(v, dict) else v


def plot_study(result: dict[str, Any]):
    """The fast measures against sparsity (top row) and against removed rank (bottom row); confirmed generation
    refusal rates as stars on the refusal panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    base = next(p for p in points if p["method"] == "none")
    fig, axes = plt.subplots(2, len(PANELS), figsize=(4.4 * len(PANELS), 7.5))
    for row, (methods, x_of, xlabel) in enumerate((
            (SPARSITY_METHODS, lambda p: 100 * p["sparsity"], "pruned weights (% of scored weights)"),
            (RANK_METHODS, lambda p: p["rank"], "safety rank removed per weight"))):
        for ax, (metric, title) in zip(axes[row], PANELS):
            for method in methods:
                pts = sorted((p for p in points if p["method"] == method), key=x_of)
                if not pts:
                    continue
                color, marker = STYLE[method]
                ax.plot([x_of(p) for p in pts], [_y(p, metric) for p in pts], color=color, marker=marker, ms=4,
                        label=method)
                if metric == "refusal_share":
                    conf = [p for p in pts if p.get("confirmed")]
                    ax.scatter([x_of(p) for p in conf], [p["confirmed"]["refusal_rate"]["value"] for p in conf],
                               color=color, marker="*", s=90, zorder=3)
            ax.axhline(_y(base, metric), color="black", ls="--", lw=0.8, label="unpruned")
            ax.set_xscale("log", base=2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
        axes[row][0].legend(fontsize=7)
    fig.suptitle(f"Pruning study of {result['model']['spec']} ({result['n_harmful']} harmful / "
                 f"{result['n_harmless']} harmless held-out prompts)", fontsize=11)
    fig.tight_layout()
    return fig


def _est(d: dict[str, float] | None) -> str:
    return "" if d is None else f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def study_table(result: dict[str, Any]) -> str:
    rows = ["| method | setting | sparsity | refusal share (fast) | refusal score | answer NLL | KL first token | "
            "refusal rate (gen.) | over-refusal (gen.) | arithmetic accuracy (gen.) |", "|---" * 10 + "|"]
    for p in result["points"]:
        setting = {"none": "", "set-difference": f"p=q={p['setting']:g}", "random": f"matched to p=q={p['setting']:g}"}
        label = setting.get(p["method"], f"r={p['rank']}" if p["rank"] else f"{p['setting']:.2%}")
        sparsity = "" if p["sparsity"] is None else f"{p['sparsity']:.2%}"
        c = p.get("confirmed") or {}
        rows.append(f"| {p['method']} | {label} | {sparsity} | {_est(p['refusal_share'])} | {p['refusal_score']:.2f} | "
                    f"{_est(p['answer_nll'])} | {p['kl_first_token']:.4f} | {_est(c.get('refusal_rate'))} | "
                    f"{_est(c.get('over_refusal'))} | {_est(c.get('utility_accuracy'))} |")
    return "\n".join(rows)


def verdict_lines(result: dict[str, Any]) -> list[str]:
    out = []
    for c in result["verdict"]["claims"]:
        word = {True: "holds", False: "does not hold", None: "not tested"}[c["holds"]]
        out.append(f"- **{c['claim']}: {word} here.** Rule: {c['rule']}. Measured: {c['evidence'] or 'no candidate'}.")
    return out


def study_markdown(result: dict[str, Any], figure: str = "pruning.png") -> str:
    s, u = result["scores"]["safety"], result["scores"]["utility"]
    cfg, base = result["config"], result["verdict"]["baseline"]
    lines = [f"# Pruning study: `{result['model']['spec']}`", "",
             f"Weights scored: {result['n_weights']:,} ({', '.join(result['kinds'])} of every block). Safety scores: "
             f"{s['description']}, first {s['config']['short_tokens']} response tokens (safety-short). Utility scores: "
             f"{u['description']}. Evaluation: {result['n_harmful']} held-out harmful and {result['n_harmless']} "
             f"harmless prompts. Fast measures at every point (refusal share: refusal score above "
             f"{result['threshold']:.2f}); generation ({cfg['max_new_tokens']} tokens, phrase matcher) at the points "
             f"the verdict rests on. Unpruned: refusal rate {base['refusal_rate']:.3f}, refusal share "
             f"{base['refusal_share']:.3f}, answer NLL {base['answer_nll']:.3f}, arithmetic accuracy "
             f"{base['utility_accuracy']:.3f}.", "",
             "## Verdict", "", *verdict_lines(result), "", f"![pruning study]({figure})", "", "## All points", "",
             study_table(result), ""]
    return "\n".join(lines)
