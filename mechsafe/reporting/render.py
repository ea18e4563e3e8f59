"""The report's page: blocks (headings, paragraphs, tables, figures) rendered to Markdown and to one self-contained
HTML file (figures embedded as base64 PNG, no external resource), plus the figures themselves."""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

Block = tuple  # ("h1"|"h2"|"p", text) | ("table", header, rows) | ("figure", file name, caption)


def fmt(x: Any) -> str:
    """The one number format of the report: ``—`` for missing, integers as they are, FLOPs-sized numbers in
    scientific notation, everything else to 3 decimals."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if abs(x) >= 1e5:
        return f"{x:.2e}"
    return str(x) if isinstance(x, int) else f"{x:.3f}"


def est(d: dict[str, float] | None) -> str:
    """An estimate dict as ``value [low, high]``."""
    if not d:
        return "—"
    return f"{fmt(d['value'])} [{fmt(d['low'])}, {fmt(d['high'])}]"


def markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]))
        elif kind == "figure":
            out.append(f"![{block[2]}](figures/{block[1]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], figures: dict[str, bytes], title: str) -> str:
    """One HTML page; every figure inlined as a data URI, so the file reads without a server or network."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}"
             "th{background:#eee}img{max-width:100%}code{background:#f4f4f4}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "figure":
            data = base64.b64encode(figures[block[1]]).decode()
            parts.append(f"<figure><img alt='{html.escape(block[2])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_harm(models: list[dict[str, Any]]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, m in enumerate(models):
        sec = m["sections"].get("harm")
        if not sec or "curves" not in sec:
            continue
        color = f"C{i}"
        for method, style in (("dense/last", "-"), ("dense/mean", "--")):
            pts = sec["curves"].get(method, [])
            ax.plot([p["layer"] for p in pts], [p["auroc"]["value"] for p in pts], style, color=color, marker="o",
                    ms=3, label=f"{m['name']}: {method}")
        ax.axhline(sec["tfidf"]["value"], color=color, ls=":", lw=1, label=f"{m['name']}: TF-IDF")
    ax.set_xlabel("layer")
    ax.set_ylabel("test AUROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_refusal(models: list[dict[str, Any]]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    keys = [("refusal", "refusal"), ("refusal_ablated", "refusal, direction ablated"),
            ("over_refusal", "over-refusal"), ("refusal_induced", "harmless refused, direction added")]
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        sec = m["sections"].get("refusal") or {}
        if "refusal" not in sec:
            continue
        vals = [sec[k]["value"] for k, _ in keys]
        errs = [[sec[k]["value"] - sec[k]["low"] for k, _ in keys], [sec[k]["high"] - sec[k]["value"] for k, _ in keys]]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, yerr=errs, label=m["name"], capsize=2)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(keys))], [label for _, label in keys],
                  fontsize=8)
    ax.set_ylabel("rate (95% Wilson interval)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_weights(models: list[dict[str, Any]]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, m in enumerate(models):
        sec = m["sections"].get("weights") or {}
        for method, style in (("set-difference", "-"), ("random", "--")):
            pts = sorted((p for p in sec.get("points", []) if p["method"] == method), key=lambda p: p["sparsity"])
            if pts:
                ax.plot([100 * p["sparsity"] for p in pts], [p["refusal_share"]["value"] for p in pts], style,
                        marker="o", ms=3, color=f"C{i}", label=f"{m['name']}: {method}")
    ax.set_xlabel("weights pruned (% of block weights)")
    ax.set_ylabel("refusal share of held-out harmful prompts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_attacks(models: list[dict[str, Any]]):
    plt = _pyplot()
    names = sorted({a for m in models for a in ((m["sections"].get("attacks") or {}).get("attacks") or {})})
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(models))
    positive = False
    for i, m in enumerate(models):
        table = (m["sections"].get("attacks") or {}).get("attacks") or {}
        broken = [(j + i * width, table[a]["flops"]) for j, a in enumerate(names)
                  if table.get(a, {}).get("flops") is not None]
        ax.bar([x for x, f in broken if f > 0], [f for _, f in broken if f > 0], width, color=f"C{i}", label=m["name"])
        for x, f in broken:
            if f == 0:  # broken without computing anything (e.g. a prefilled answer)
                ax.text(x, 0.02, "free", transform=ax.get_xaxis_transform(), ha="center", fontsize=7, color=f"C{i}")
        positive |= any(f > 0 for _, f in broken)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(names))], names, fontsize=8)
    ax.set_xlim(-width, len(names) - 1 + width * len(models))
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("FLOPs to break (missing: not broken)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=f"C{i}", label=m["name"]) for i, m in enumerate(models)], fontsize=8)
    fig.tight_layout()
    return fig

