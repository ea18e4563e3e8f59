"""The attack bench's report: the cost to break per attack, refusal-vs-FLOPs curves, the threat model."""

from __future__ import annotations

from typing import Any

COLORS = {"harmful-lora": "tab:red", "harmful-full": "tab:purple", "benign-lora": "tab:blue", "direction": "tab:green",
          "pruning": "tab:orange", "prefill": "tab:gray", "structural": "tab:brown"}


def plot_curves(result: dict[str, Any]):
    """Fast refusal share and answer NLL against attack FLOPs (log x), one line per trial, coloured by attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    seen = set()
    for trial in result["trials"]:
        pts = [p for p in trial["curve"] if p["flops"] > 0]
        if not pts:
            continue
        color = COLORS.get(trial["attack"], "black")
        label = None if trial["attack"] in seen else trial["attack"]
        seen.add(trial["attack"])
        for ax, key in zip(axes, ("refusal", "nll")):
            ax.plot([p["flops"] for p in pts], [p[key] for p in pts], color=color, alpha=0.55, marker=".", ms=3,
                    label=label)
    base, threat = result["base"], result["threat"]
    axes[0].axhline(base["refusal"], color="black", ls="--", lw=0.8, label="unattacked")
    axes[0].axhline(base["refusal"] * threat["refusal_fraction"], color="black", ls=":", lw=0.8, label="broken below")
    axes[1].axhline(base["nll"], color="black", ls="--", lw=0.8)
    axes[1].axhline(base["nll"] * (1 + threat["utility_nll"]), color="black", ls=":", lw=0.8, label="utility bound")
    for ax, title in zip(axes, ("refusal share (fast score, held-out harmful)", "reference-answer NLL")):
        ax.set_xscale("log")
        ax.set_xlabel("attack FLOPs")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Attack bench: {result['model']['spec']}", fontsize=11)
    fig.tight_layout()
    return fig


def _flops(v: float | None) -> str:
    return "not broken" if v is None else ("0 (no gradient step)" if v == 0 else f"{v:.3g}")


def bench_table(result: dict[str, Any]) -> str:
    build = result.get("build_flops")
    rows = ["| attack | trials | broken | cost to break (FLOPs) | % of building | steps | tokens | setting | refusal rate "
            "(generation) | NLL | cost to refusal <= abs. threshold |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack, s in result["summary"].items():
        c = s["cost_to_break"]
        if c is None:
            rows.append(f"| {attack} | {s['trials']} | 0 | not broken | | | | | | | {_flops(s['cost_to_absolute'])} |")
            continue
        share = f"{100 * c['flops'] / build:.3g}%" if build and c["flops"] else ""
        setting = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in c["setting"].items())
        r = c["refusal_rate"]
        rows.append(f"| {attack} | {s['trials']} | {s['broken_trials']} | {_flops(c['flops'])} | {share} | {c['step']} | "
                    f"{c.get('tokens') or ''} | {setting} | {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}] | {c['nll']:.3f} | "
                    f"{_flops(s['cost_to_absolute'])} |")
    return "\n".join(rows)


def refusal_only_table(result: dict[str, Any]) -> str:
    rows = ["| attack | least FLOPs | step | refusal share (fast) | answer NLL there |", "|---|---|---|---|---|"]
    for attack, s in result["summary"].items():
        r = s.get("refusal_only")
        rows.append(f"| {attack} | not reached | | | |" if r is None else
                    f"| {attack} | {_flops(r['flops'])} | {r['step']} | {r['refusal']:.3f} | {r['nll']:.3f} |")
    return "\n".join(rows)


def seeds_table(result: dict[str, Any]) -> str:
    rows = ["| attack | lr | examples | seeds broken | mean FLOPs to break |", "|---|---|---|---|---|"]
    for attack, s in result["summary"].items():
        for g in s.get("by_setting", []):
            mean = "" if g["mean_flops_to_break"] is None else f"{g['mean_flops_to_break']:.3g}"
            rows.append(f"| {attack} | {g['lr']:g} | {g['n_examples'] or 'all'} | {g['broken_seeds']}/{g['seeds']} | {mean} |")
    return "\n".join(rows)


def bench_markdown(result: dict[str, Any], figure: str = "curves.png") -> str:
    base, conf = result["base"], result["base_confirmed"]["refusal_rate"]
    build = result.get("build_flops")
    return "\n".join([
        f"# Attack bench: `{result['model']['spec']}`", "",
        f"**Threat model.** {result['threat_text']}.", "",
        f"Unattacked: refusal rate {conf['value']:.3f} [{conf['low']:.3f}, {conf['high']:.3f}] by generation "
        f"({result['base_confirmed']['n']} held-out harmful prompts); fast refusal share {base['refusal']:.3f} "
        f"(refusal score above {result['calibration']['threshold']:.2f}); reference-answer NLL {base['nll']:.3f}. "
        + (f"Building the model cost {build:.3g} FLOPs." if build else "The FLOPs of building the model are unknown."), "",
        "## Cost to break", "", bench_table(result), "", f"![curves]({figure})", "",
        "## Refusal alone", "", "The cheapest point of each attack where the fast refusal share falls to the threat "
        "model's level, whatever utility does (the NLL there shows what it cost):", "", refusal_only_table(result), "",
        "## Fine-tuning settings over seeds", "", seeds_table(result), ""])
