"""The drift study's figures and report."""

from __future__ import annotations

from typing import Any

import numpy as np

from mechsafe.drift.study import GROUP_ORDER

_LABELS = {"relative": "relative change ‖Δ‖/‖w0‖", "l2": "L2 distance ‖Δ‖", "cosine_distance": "1 - cosine"}
_COLORS = {"top-safety": "tab:red", "set-difference": "tab:purple", "top-utility": "tab:blue", "random": "tab:gray"}


def plot_series(result: dict[str, Any], unit: str = "neuron"):
    """Drift against step per group (mean over seeds and neurons; band: 95% bootstrap interval over the units of
    their mean over seeds), per condition and metric."""
    import matplotlib.pyplot as plt

    conditions = list(result["series"])
    metrics = list(_LABELS)
    fig, axes = plt.subplots(len(metrics), len(conditions), figsize=(5 * len(conditions), 3.2 * len(metrics)),
                             squeeze=False)
    for j, condition in enumerate(conditions):
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            for group in GROUP_ORDER:
                s = result["series"][condition][unit][metric].get(group)
                if s is None:
                    continue
                per_seed = np.array(s["per_seed"])
                ax.plot(s["steps"], per_seed.mean(0), label=group, color=_COLORS[group])
                ax.fill_between(s["steps"], s["low"], s["high"], color=_COLORS[group], alpha=0.2)
            ax.set_title(f"{condition} fine-tune ({unit}s)")
            ax.set_xlabel("step")
            ax.set_ylabel(_LABELS[metric])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_final(result: dict[str, Any]):
    """Distributions of the neurons' relative change at the end of each condition, per group."""
    import matplotlib.pyplot as plt

    conditions = list(result["final_relative"])
    fig, axes = plt.subplots(1, len(conditions), figsize=(5 * len(conditions), 3.6), squeeze=False)
    for ax, condition in zip(axes[0], conditions):
        groups = [g for g in GROUP_ORDER if g in result["final_relative"][condition]]
        ax.boxplot([result["final_relative"][condition][g] for g in groups], showfliers=False)
        ax.set_xticks(range(1, len(groups) + 1), groups, fontsize=8)
        ax.set_title(f"{condition}: neurons at the last step")
        ax.set_ylabel(_LABELS["relative"])
    fig.tight_layout()
    return fig


def plot_freezing(result: dict[str, Any]):
    """Refusal share against step of the freezing runs, one panel per frozen share."""
    import matplotlib.pyplot as plt

    runs = result["freezing"]
    fractions = sorted({r["fraction"] for r in runs if r["group"] != "none"})
    fig, axes = plt.subplots(1, max(1, len(fractions)), figsize=(4.2 * max(1, len(fractions)), 3.4), squeeze=False)
    plain = next((r for r in runs if r["group"] == "none"), None)
    for ax, fraction in zip(axes[0], fractions):
        if plain:
            ax.plot([p["step"] for p in plain["curve"]], [p["refusal"] for p in plain["curve"]], "k--", label="none")
        for r in runs:
            if r["fraction"] == fraction:
                ax.plot([p["step"] for p in r["curve"]], [p["refusal"] for p in r["curve"]], marker="o",
                        label=r["group"], color=_COLORS[r["group"]])
        ax.set_title(f"{fraction:.1%} of MLP neurons frozen")
        ax.set_xlabel("step")
        ax.set_ylabel("refusal share")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def markdown(result: dict[str, Any]) -> str:
    """The study's report: setup, group drift with intervals, the tests, the freezing table and the verdict."""
    cfg = result["config"]
    v = result["verdict"]
    lines = [f"# Safety-neuron drift: {result['model']['spec']}", "",
             f"**Verdict: {v['answer']}** — {v['reason']}.", "",
             f"Rule: a safety group drifts more than random when Cohen's d >= {v['rule']['min_d']} and the "
             f"Holm-adjusted p < {v['rule']['alpha']} in both Welch's t and Mann-Whitney U ({v['rule']['metric']} "
             f"change of MLP neurons, {v['rule']['condition']} fine-tune, mean over seeds per neuron) -> H1; otherwise "
             "H2 if the harmful fine-tune halved the refusal share, else inconclusive.", "",
             f"Drift runs: {cfg['method']}, lr {cfg['lr']:g}, {cfg['steps']} steps of {cfg['batch_size']} pairs, "
             f"{cfg['n_examples']} pairs per seed, seeds {cfg['seeds']}, recorded every {cfg['every']} steps. "
             f"Tracking cost {result['overhead']['tracking_over_training']:.1%} of the training time, the recorded "
             f"evaluation {result['overhead']['evaluation_over_training']:.1%}.", "",
             "| group | units (neurons / heads) | mean initial norm (neurons / heads) | description |",
             "|---|---|---|---|"]
    norms = result["initial_norms"]
    for g in GROUP_ORDER:
        if g in result["groups"]:
            n = result["groups"][g]
            lines.append(f"| {g} | {n['neuron']} / {n['head']} | {norms['neuron'].get(g, float('nan')):.3f} / "
                         f"{norms['head'].get(g, float('nan')):.3f} | {result['group_descriptions'].get(g, '')} |")
    lines += ["", "## Drift at the last step (MLP neurons)", "",
              "| condition | metric | group | mean | 95% CI over neurons | 95% CI over seeds |", "|---|---|---|---|---|---|"]
    for c, units in result["summaries"].items():
        for metric, groups in units["neuron"].items():
            for g in GROUP_ORDER:
                if g in groups:
                    s = groups[g]
                    lines.append(f"| {c} | {metric} | {g} | {s['mean']:.4g} | [{s['over_units']['low']:.4g}, "
                                 f"{s['over_units']['high']:.4g}] | [{s['over_seeds']['low']:.4g}, "
                                 f"{s['over_seeds']['high']:.4g}] |")
    lines += ["", "## Tests (per neuron, Holm-adjusted over the whole family)", "",
              "| condition | metric | group vs baseline | Cohen's d | Welch p (Holm) | Mann-Whitney p (Holm) |",
              "|---|---|---|---|---|---|"]
    for t in result["tests"]:
        lines.append(f"| {t['condition']} | {t['metric']} | {t['group']} vs {t['baseline']} | {t['d']:.3f} | "
                     f"{t['welch_p_holm']:.3g} | {t['mwu_p_holm']:.3g} |")
    refusal = {c: [float(np.mean([run[i]["refusal"] for run in e])) for i in range(min(len(r) for r in e))]
               for c, e in result["evals"].items()}
    nll = {c: [float(np.mean([run[i]["nll"] for run in e])) for i in range(min(len(r) for r in e))]
           for c, e in result["evals"].items()}
    lines += ["", "## Refusal share and answer NLL along the drift runs (mean over seeds)", "",
              "| condition | refusal share by record | answer NLL by record |", "|---|---|---|"]
    for c in refusal:
        lines.append(f"| {c} | {', '.join(f'{x:.2f}' for x in refusal[c])} | {', '.join(f'{x:.3f}' for x in nll[c])} |")
    if result["freezing"]:
        lines += ["", f"## Freezing (harmful full fine-tune, lr {cfg['freeze_lr']:g}, {cfg['freeze_steps']} steps)", "",
                  "| frozen group | share of neurons | neurons | refusal share by step | final NLL | frozen bit-identical |",
                  "|---|---|---|---|---|---|"]
        for r in result["freezing"]:
            curve = ", ".join(f"{p['step']}: {p['refusal']:.2f}" for p in r["curve"])
            lines.append(f"| {r['group']} | {r['fraction']:.1%} | {r['n_neurons']} | {curve} | "
                         f"{r['curve'][-1]['nll']:.3f} | {r['frozen_identical']} |")
    lines += ["", f"Time: {', '.join(f'{k} {v:.0f} s' for k, v in result['timings_s'].items())}.", ""]
    return "\n".join(lines)
