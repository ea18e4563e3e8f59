"""Know your data before probing it: class and group balance, prompt lengths, duplicates, likely noise.

:func:`describe` answers the questions a probe's result depends on: is one class longer than the other (a
probe may read length, not harm), does a group sit in one class only, are there exact or near-duplicate
prompts (which inflate test scores when they straddle splits), and are there prompts too short to mean
anything ("Is", "how to")?

Near-duplicates are pairs whose content words (lowercased, stop words dropped) have a Jaccard similarity of
at least ``near_threshold``; normalized duplicates are equal after lowercasing and removing punctuation.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from mechsafe.data import PromptSet

_WORD = re.compile(r"[a-z0-9']+")


def normalize(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: prompts equal under it are normalized duplicates."""
    return " ".join(_WORD.findall(text.lower()))


@dataclasses.dataclass
class Description:
    """What :func:`describe` found (every count refers to the prompts of ``name``)."""

    name: str
    n: int
    class_counts: dict[str, int]
    """Prompts per class."""
    split_counts: dict[str, dict[str, int]]
    """Prompts per split and class."""
    group_counts: dict[str, dict[str, int]]
    """Prompts per group and class."""
    length_words: dict[str, dict[str, float]]
    """Per class: mean, median, min and max length in words."""
    group_mean_length: dict[str, dict[str, float | None]]
    """Mean length in words per group and class (``None`` where the group has no prompt of that class)."""
    exact_duplicates: list[list[int]]
    """Groups of prompt indices with identical text."""
    normalized_duplicates: list[list[int]]
    """Groups equal only after :func:`normalize` (exact duplicates left out)."""
    near_duplicates: list[tuple[int, int, float]]
    """Pairs ``(i, j, jaccard)`` of content-word sets at or above the threshold, not already duplicates."""
    cross_split_duplicates: int
    """Duplicate groups (exact or normalized) and near-duplicate pairs whose prompts lie in different splits."""
    short_prompts: list[int]
    """Prompts of at most ``short_words`` words: likely noise."""
    label_names: list[str]
    texts: list[str] = dataclasses.field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("texts")
        return out

    def markdown(self, examples: int = 5) -> str:
        """The report: tables of counts and lengths, then examples of each kind of suspect prompt."""
        classes = self.label_names
        lines = [f"# Data: {self.name}", "", f"{self.n} prompts, {len(classes)} classes.", "",
                 "| class | prompts | mean words | median | min | max |", "|---|---:|---:|---:|---:|---:|"]
        for c in classes:
            s = self.length_words.get(c)
            if s:
                lines.append(f"| {c} | {self.class_counts[c]} | {s['mean']:.1f} | {s['median']:.0f} | {s['min']:.0f} | "
                             f"{s['max']:.0f} |")
        lines += ["", "Prompts per split:", "", "| split | " + " | ".join(classes) + " |",
                  "|---|" + "---:|" * len(classes)]
        lines += [f"| {sp} | " + " | ".join(str(row.get(c, 0)) for c in classes) + " |"
                  for sp, row in self.split_counts.items()]
        lines += ["", "Mean length in words per group (prompts in brackets):", "",
                  "| group | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for g, row in self.group_mean_length.items():
            cells = [f"{row[c]:.1f} ({self.group_counts[g][c]})" if row.get(c) is not None else "–" for c in classes]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines += ["", f"- exact duplicate groups: {len(self.exact_duplicates)}",
                  f"- normalized duplicate groups (case, punctuation): {len(self.normalized_duplicates)}",
                  f"- near-duplicate pairs: {len(self.near_duplicates)}",
                  f"- duplicates or near-duplicates across splits: {self.cross_split_duplicates}",
                  f"- very short prompts: {len(self.short_prompts)}", ""]
        for title, groups in (("Exact duplicates", self.exact_duplicates),
                              ("Normalized duplicates", self.normalized_duplicates)):
            if groups:
                lines += [f"## {title}", ""] + [f"- {[self.texts[i] for i in g]!r}" for g in groups[:examples]] + [""]
        if self.near_duplicates:
            lines += ["## Near-duplicates", ""] + [f"- {j:.2f}: {self.texts[a]!r} ~ {self.texts[b]!r}"
                                                   for a, b, j in self.near_duplicates[:examples]] + [""]
        if self.short_prompts:
            lines += ["## Very short prompts", ""] + [f"- {self.texts[i]!r}" for i in self.short_prompts[:examples]] + [""]
        return "\n".join(lines)


def duplicate_groups(keys: list[str]) -> list[list[int]]:
    """Groups of the indices whose keys are equal (groups of one left out), in order of first appearance."""
    where: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        where.setdefault(k, []).append(i)
    return [g for g in where.values() if len(g) > 1]


def near_duplicate_pairs(texts: list[str], threshold: float = 0.8) -> list[tuple[int, int, float]]:
    """Pairs of prompts whose content-word sets (English stop words dropped) have Jaccard similarity ≥ ``threshold``."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(binary=True, stop_words="english", token_pattern=r"(?u)\b\w+\b", lowercase=True)
    try:
        X = vec.fit_transform(texts).tocsr().astype(np.int32)
    except ValueError:  # nothing but stop words
        return []
    sizes = np.asarray(X.sum(1)).ravel()
    inter = (X @ X.T).tocoo()
    out = []
    for i, j, k in zip(inter.row, inter.col, inter.data):
        if i < j:
            jac = k / (sizes[i] + sizes[j] - k)
            if jac >= threshold:
                out.append((int(i), int(j), float(jac)))
    return sorted(out, key=lambda t: (-t[2], t[0], t[1]))


def describe(prompts: PromptSet, near_threshold: float = 0.8, short_words: int = 2) -> Description:
    """Describe ``prompts`` (see the module docstring)."""
    texts = list(prompts.texts)
    names = list(prompts.label_names)
    classes = [names[int(y)] for y in prompts.labels]
    words = np.array([len(t.split()) for t in texts])
    class_counts = {c: classes.count(c) for c in names if c in classes}
    split_counts = {sp: {c: sum(1 for s, k in zip(prompts.splits, classes) if s == sp and k == c) for c in names}
                    for sp in sorted(set(prompts.splits))}
    group_counts: dict[str, dict[str, int]] = {}
    group_len: dict[str, dict[str, list[int]]] = {}
    for g, c, w in zip(prompts.groups, classes, words):
        group_counts.setdefault(g, dict.fromkeys(names, 0))[c] += 1
        group_len.setdefault(g, {}).setdefault(c, []).append(int(w))
    group_mean = {g: {c: float(np.mean(v[c])) if c in v else None for c in names} for g, v in sorted(group_len.items())}
    length = {c: {"mean": float(words[m].mean()), "median": float(np.median(words[m])), "min": float(words[m].min()),
                  "max": float(words[m].max())}
              for c in names if (m := np.array([k == c for k in classes])).any()}
    exact = duplicate_groups(texts)
    in_exact = {i for g in exact for i in g}
    normalized = [g for g in duplicate_groups([normalize(t) for t in texts]) if not set(g) <= in_exact
                  and len({texts[i] for i in g}) > 1]
    dup_sets = [set(g) for g in exact + normalized]
    same_group = {(a, b) for g in dup_sets for a in g for b in g}
    near = [p for p in near_duplicate_pairs(texts, near_threshold) if (p[0], p[1]) not in same_group]
    splits = prompts.splits
    cross = (sum(len({splits[i] for i in g}) > 1 for g in dup_sets)
             + sum(splits[a] != splits[b] for a, b, _ in near))
    short = [i for i, w in enumerate(words) if w <= short_words]
    return Description(str(prompts.name), len(texts), class_counts, split_counts,
                       {g: group_counts[g] for g in sorted(group_counts)}, length, group_mean, exact, normalized,
                       near, cross, short, names, texts)


def plot(description: Description, prompts: PromptSet, out_dir: Path) -> list[Path]:
    """Figures: prompt length per class (histogram) and prompts per group and class (bars)."""
    from matplotlib.figure import Figure

    names = description.label_names
    classes = np.array([int(y) for y in prompts.labels])
    words = np.array([len(t.split()) for t in prompts.texts])
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    bins = np.linspace(0, max(words.max(), 1), 30)
    for k, name in enumerate(names):
        if (classes == k).any():
            ax.hist(words[classes == k], bins=bins, alpha=0.5, label=name)
    ax.set_xlabel("prompt length (words)")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "lengths.png"]
    fig.savefig(paths[0], dpi=110)
    groups = list(description.group_counts)
    fig = Figure(figsize=(max(6, 0.5 * len(groups) + 2), 3.5))
    ax = fig.subplots()
    bottom = np.zeros(len(groups))
    for name in names:
        counts = np.array([description.group_counts[g].get(name, 0) for g in groups])
        ax.bar(groups, counts, bottom=bottom, label=name)
        bottom += counts
    ax.set_ylabel("prompts")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "groups.png")
    fig.savefig(paths[1], dpi=110)
    return paths
