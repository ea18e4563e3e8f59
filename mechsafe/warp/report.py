"""The WaRP comparison's figures and report."""

from __future__ import annotations

from typing import Any

_COLORS = {"none": "black", "full": "tab:red", "selected": "tab:orange", "lora": "tab:blue", "safelora": "tab:cyan",
           "original-mask": "tab:purple", "warp": "tab:green"}
_REFERENCE = {"full FT": (20.78, 41.17), "vanilla LoRA": (36.80, 39.20), "SafeLoRA": (8.81, 32.83),
              "original-space mask": (9.17, 40.41), "WSR-Tune (WaRP, 10%)": (6.90, 38.99)}
"""The safety port's table (Llama-2-7B-chat, GSM8K fine-tune): HarmBench average ASR (%) and GSM8K accuracy (%)."""


def _ci(e: dict[str, float]) -> str:
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def _err(e: dict[str, float]) -> list[list[float]]:
    return [[e["value"] - e["low"]], [e["high"] - e["value"]]]


def plot_pareto(result: dict[str, Any]):
    """Refusal rate on held-out harmful prompts against task accuracy after fine-tuning, one point per run (95%
    intervals): up and to the right is better."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for row in result["summary"]:
        ax.errorbar(row["accuracy"]["value"], row["refusal"]["value"], xerr=_err(row["accuracy"]),
                    yerr=_err(row["refusal"]), fmt="o", color=_COLORS[row["method"]], capsize=2, alpha=0.85)
        ax.annotate(row["label"], (row["accuracy"]["value"], row["refusal"]["value"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("exact-match accuracy on held-out problems")
    ax.set_ylabel("refusal rate on held-out harmful prompts")
    ax.set_title(f"safety vs utility after fine-tuning ({result['model']['spec']})")
    fig.tight_layout()
    return fig


def plot_keep_ratio(result: dict[str, Any]):
    """Refusal rate (and task accuracy) after WaRP fine-tuning against the keep ratio, with the reference and full
    fine-tuning as lines."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["method"] == "warp"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if rows:
        ratios = [r["keep_ratio"] for r in rows]
        ax.errorbar(ratios, [r["refusal"]["value"] for r in rows],
                    yerr=[[r["refusal"]["value"] - r["refusal"]["low"] for r in rows],
                          [r["refusal"]["high"] - r["refusal"]["value"] for r in rows]],
                    fmt="o-", color=_COLORS["warp"], capsize=2, label="WaRP: refusal")
        ax.plot(ratios, [r["accuracy"]["value"] for r in rows], "s--", color=_COLORS["warp"], alpha=0.6,
                label="WaRP: accuracy")
        ax.set_xscale("log")
    for row in result["summary"]:
        if row["method"] in ("none", "full", "original-mask"):
            ax.axhline(row["refusal"]["value"], color=_COLORS[row["method"]], lw=1, ls=":",
                       label=f"{row['label']}: refusal")
    ax.set_xlabel("keep ratio (share of rotated coefficients frozen)")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def table(result: dict[str, Any]) -> str:
    lines = ["| run | refusal (harmful) | over-refusal (harmless) | accuracy | Δ accuracy | solution NLL | "
             "instruction NLL | refusal − full (paired) | harmful LoRA attack | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        a = r["attack"]
        if not a["attacked"]:
            attack = "—"
        elif a["broken"]:
            attack = f"broken at step {a['step']} ({a['flops']:.2e} FLOPs)"
        else:
            attack = f"not broken in {a['steps_run']} steps (share {a['refusal_share_last']:.2f})"
        gain = f"{r['accuracy_gain']:+.2f}" if "accuracy_gain" in r else "—"
        vs_full = _ci(r["refusal_vs_full"]) if "refusal_vs_full" in r else "—"
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "—"
        lines.append(f"| {r['label']} | {_ci(r['refusal'])} | {_ci(r['over_refusal'])} | {_ci(r['accuracy'])} | "
                     f"{gain} | {r['answer_nll']['value']:.3f} | {r['instruction_nll']['value']:.3f} | {vs_full} | "
                     f"{attack} | {secs} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any], figures: tuple[str, str] = ("pareto.png", "keep-ratio.png")) -> str:
    cfg, warp, v = result["config"], result["warp"], result["verdict"]
    lines = [f"# WaRP against its peers: {result['model']['spec']}", "",
             f"**Published ordering (WaRP keeps more safety than full fine-tuning at similar utility): {v['answer']}** "
             f"— {v['reason']}." + (f" Mask effect: {v['mask_effect']}." if v.get("mask_effect") else ""), "",
             f"Fine-tuning: {result['task']}; {cfg['steps']} steps of {cfg['batch_size']} problems for every method "
             f"(same batches), lr {cfg['lr']:g} (weights) / {cfg['lora_lr']:g} (LoRA, rank {cfg['lora_rank']}). "
             f"WaRP protects {', '.join(warp['layer_types'])} in blocks {warp['layers']} ({warp['basis']} basis, "
             f"{warp['quantile']} quantile, {warp['granularity']} masks, importance on {warp['loss_tokens']} tokens of "
             f"{result['safety_data']}). Safety: {result['n_harmful']} held-out harmful and {result['n_harmless']} "
             f"harmless prompts, {cfg['max_new_tokens']} generated tokens, phrase matcher. Attack: the bench's harmful "
             f"LoRA fine-tune (lr {cfg['attack_lr']:g}, {cfg['attack_examples']} pairs, up to {cfg['attack_steps']} "
             f"steps, evaluated every {cfg['attack_every']}); threat model: {result['threat_model']}.", "",
             table(result), "",
             f"![safety vs utility]({figures[0]})", "", f"![refusal vs keep ratio]({figures[1]})", "",
             "Published (Llama-2-7B-chat, GSM8K; HarmBench ASR % / GSM8K %): "
             + "; ".join(f"{k} {a:g} / {b:g}" for k, (a, b) in _REFERENCE.items()) + ".", "",
             "Timings (s): " + ", ".join(f"{k} {v:g}" for k, v in result["timings_s"].items()) + "."]
    return "\n".join(lines) + "\n"
