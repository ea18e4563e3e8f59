"""The claims study's report: the four-criteria table, costs, search quality, curves and a conclusion."""

from __future__ import annotations

import math
from typing import Any

from mechsafe.mfs.claims import cheapest
from mechsafe.reporting.render import est


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (0 < abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def _fit(fit: dict[str, Any] | None) -> str:
    if fit is None:
        return "— (fewer than two broken sizes)"
    ci = "" if fit["low"] is None else f" [{fit['low']:.2f}, {fit['high']:.2f}]"
    return f"{fit['slope']:.2f}{ci} (n={fit['n']})"


def _break(summary: dict[str, Any], attack: str) -> str:
    entry = summary.get(attack)
    if entry is None:
        return "not run"
    cost = entry["cost_to_break"]
    if cost is None:
        return "not broken"
    setting = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in cost["setting"].items())
    return f"{_num(float(cost['flops']))}" + (f" ({setting})" if setting else "")


def conclusion(results: dict[str, Any]) -> list[str]:
    """Plain-language sentences computed from the results."""
    rows = results["criteria"]
    held = [r["claim"][3:] for r in rows if r["met"]]
    failed = [r["claim"][3:] for r in rows if r["met"] is False]
    top = str(max(results["sizes"]))
    best = cheapest(results["mfs"][top]["bench"]["summary"], results["config"]["budget_flops"])
    out = [f"Of the seed's four claims, {len(held)} held and {len(failed)} did not on this model and these prompts."]
    if failed:
        out.append("Not met: " + "; ".join(failed) + ".")
    if held:
        out.append("Met: " + "; ".join(held) + ".")
    if best is not None:
        out.append(f"The cheapest way found to remove the safety of the {top}-feature MFS model is `{best['attack']}` "
                   f"at {_num(float(best['flops']))} FLOPs.")
    else:
        out.append(f"No attack of the study removed the safety of the {top}-feature MFS model.")
    return out


def claims_markdown(results: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    c = results["config"]
    top = str(max(results["sizes"]))
    main = results["mfs"][top]
    base_summary = results["baseline"]["bench"]["summary"]
    mfs_summary = main["bench"]["summary"]
    lines = [f"# MFS claims: {top} embedded safety neurons vs `{c['baseline']}`", "",
             f"Profile `{c['profile']}`; MFS models built from `{c['base']}` with {c['embed_steps']} training steps "
             f"at sizes {', '.join(str(n) for n in results['sizes'])}; held-out prompts: {results['data']['harmful']} "
             f"harmful, {results['data']['harmless']} harmless; study time {results['seconds']:.0f} s.", "",
             "**Threat model**: " + results["threat"] + ". The adaptive attacker also knows how MFS models are made "
             "(added MLP neurons with zero-initialised write rows) and, for `mfs-diff` and `mfs-layout`, has the "
             "public "
             "base model." + (f" Budget: {c['budget_flops']:.3g} FLOPs per attack." if c["budget_flops"] else ""), "",
             "## The four criteria", "", "| claim | measured | threshold | met | detail |", "|---|---|---|---|---|"]
    for r in results["criteria"]:
        met = "—" if r["met"] is None else ("met" if r["met"] else "not met")
        lines.append(f"| {r['claim']} | {_num(r['measured'])} | {r['threshold']} | {met} | {r['note']} |")
    lines += ["", "## Cost to break, per attack (FLOPs, worst case over the sweep)", "",
              f"| attack | {c['baseline']} | MFS {top} | MFS / aligned |", "|---|---|---|---|"]
    for attack in dict.fromkeys(list(base_summary) + list(mfs_summary)):
        a = (base_summary.get(attack) or {}).get("cost_to_break")
        m = (mfs_summary.get(attack) or {}).get("cost_to_break")
        ratio = "—" if not a or not m or not a["flops"] else _num(m["flops"] / a["flops"])
        lines.append(f"| {attack} | {_break(base_summary, attack)} | {_break(mfs_summary, attack)} | {ratio} |")
    lines.append("| structural, detector mode | — | 0 | — |")
    lines += ["", "Detector mode keeps its bank as a separate module: under open weights, deleting it removes the "
              "guard at zero cost, whatever the bank's size or aggregation."]
    costs = results["costs"]
    built = ("not counted in this profile" if main["build_flops"] is None else
             f"{_num(float(main['build_flops']))} FLOPs (reference passes {_num(float(main['setup_flops']))} once, "
             "then "
             f"{c['embed_steps']} steps of {_num(float(main['step_flops']))})")
    lines += ["", f"Building the MFS model: {built}. Retraining ({costs['retrain_definition']}): "
              f"{_num(costs['retrain_flops'])} FLOPs.", "",
              "## How well the attacker finds the added neurons", "",
              "| search | neurons found | recall | precision | FLOPs |", "|---|---|---|---|---|"]
    for method, s in main["search"].items():
        if "recall" in s:
            lines.append(f"| {method} | {s['found']} | {_num(s['recall'])} | {_num(s['precision'])} | "
                         f"{_num(float(s['flops']))} |")
    if "sae" in main["search"]:
        s = main["search"]["sae"]
        layers = ", ".join(map(str, s["layers"]))
        lines.append(f"| sae (blocks {layers}) | latents | — | — | {_num(float(s['flops']))} |")
    lines += ["", "Refusal rate of the held-out harmful prompts by generation after each removal (unattacked: "
              f"{main['bench']['base_confirmed']['refusal_rate']['value']:.3f}):", "",
              "| attack | " + " | ".join(f"{f:g}" for f in c["fractions"]) + " |",
              "|---|" + "---|" * len(c["fractions"])]
    for attack in ("mfs-random", "mfs-stats", "mfs-diff"):
        trials = {t["fraction"]: t["curve"][0]["refusal"] for t in main["bench"]["trials"] if t["attack"] == attack}
        if trials:
            lines.append(f"| {attack} | " + " | ".join(_num(trials.get(f)) for f in c["fractions"]) + " |")
    det = results.get("detector")
    if det:
        lines += ["", f"## Detector mode: attacking the aggregator ({det['n_features']} features, {det['n_groups']} "
                  f"groups, rule `{det['rule']}`)", "",
                  f"Unattacked, the bank flags {det['flagged']['harmful']:.3f} of the held-out harmful and "
                  f"{det['flagged']['harmless']:.3f} of the harmless prompts. Zeroing the votes of the groups that "
                  f"score highest on the attacker's harmful prompts (ranking: {_num(det['aggregator_flops'])} FLOPs):",
                  "", "| groups zeroed | harmful flagged | harmless flagged |", "|---|---|---|"]
        lines += [f"| {p['groups']} ({p['share']:.0%}) | {p['harmful']:.3f} | {p['harmless']:.3f} |"
                  for p in det["aggregator_attack"]]
        b = det["aggregator_break"]
        lines += ["", "The flagged share of harmful prompts halves at " + (f"{b['groups']} groups." if b else
                                                                           "no tested share.")]
    sc = results["scaling"]
    if len(sc["sizes"]) < 2:
        lines += ["", "## Scaling with the number of features", "",
                  "One size in this study: no scaling fit (the full profile builds three).", ""]
    else:
        lines += ["", "## Scaling with the number of features", "",
                  "| sizes | " + " | ".join(str(n) for n in sc["sizes"]) + " | log-log slope [95% CI] |",
                  "|---|" + "---|" * (len(sc["sizes"]) + 1),
                  "| build FLOPs | " + " | ".join(_num(None if f is None else float(f)) for f in sc["build"]["flops"])
                  + f" | {_fit(sc['build']['fit'])} |",
                  "| cheapest break | "
                  + " | ".join(_num(None if f is None else float(f)) for f in sc["cheapest"]["flops"])
                  + f" | {_fit(sc['cheapest']['fit'])} |"]
        for attack, s in sc["attacks"].items():
            lines.append(f"| {attack} | " + " | ".join(_num(None if f is None else float(f)) for f in s["flops"])
                         + f" | {_fit(s['fit'])} |")
        lines += ["", "A slope above 1 with its interval above 1 would be the superlinear growth the seed expects; "
                  "attacks that break at zero FLOPs have no log-log slope.", ""]
    perf = results["performance"]
    lines += ["## Performance", "", "| model | refusal | over-refusal | arithmetic | answer NLL "
              "| KL to base (harmless) "
              "| forward s | parameters MB |", "|---|---|---|---|---|---|---|---|"]
    for name in ("base", "aligned", "mfs"):
        p = perf[name]
        lines.append(f"| {name} | {est(p['refusal_rate'])} | {est(p['over_refusal'])} "
                     f"| {est(p['utility_accuracy'])} "
                     f"| {est(p['answer_nll'])} | {est(p['kl_harmless'])} | {p['latency_s']:.3f} | "
                     f"{p['param_bytes'] / 2**20:.0f} |")
    lines += ["", "## Conclusion", ""] + conclusion(results) + [""]
    for name, caption in (figures or {}).items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def plot_claims(results: dict[str, Any]):
    """Left: fast refusal share vs share of added neurons removed (largest model); right: cost to break and build
    FLOPs vs number of features (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = str(max(results["sizes"]))
    main = results["mfs"][top]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for attack, style in (("mfs-random", "o-"), ("mfs-stats", "s--"), ("mfs-diff", "^:")):
        pts = sorted((t["fraction"], t["curve"][0]["refusal"]) for t in main["bench"]["trials"]
                     if t["attack"] == attack)
        if pts:
            left.plot(*zip(*pts), style, label=attack)
    base = main["bench"]["base_confirmed"]["refusal_rate"]["value"]
    left.axhline(base, color="grey", lw=0.8, label="unattacked")
    left.axhline(0.5 * base, color="red", lw=0.8, ls="--", label="broken at or below")
    left.set(xlabel="share of added neurons removed", ylabel="refusal rate (generation)", title=f"MFS {top}: removal")
    left.legend(fontsize=8)
    sc = results["scaling"]
    pts = [(n, f) for n, f in zip(sc["sizes"], sc["build"]["flops"]) if f]
    if pts:
        right.plot(*zip(*pts), "k-o", label="build")
    for attack, s in sc["attacks"].items():
        pts = [(n, f) for n, f in zip(sc["sizes"], s["flops"]) if f]
        if pts:
            right.plot(*zip(*pts), "--s", label=f"break: {attack}")
    right.set(xscale="log", yscale="log", xlabel="added neurons", ylabel="FLOPs", title="cost vs number of features")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
