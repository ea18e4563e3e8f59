"""Prompt sets: bundled suites, Hugging Face datasets by name, and local files with column mapping.

Bundled suites (written for this project, shipped in ``mechsafe/data/suites``):

* ``harmful_vs_harmless`` — binary, label 1 = harmful (6 harm categories) vs 0 = harmless;
* ``toxicity_vs_other_harm`` — binary within harmful prompts, 1 = ``toxicity_hate``;
* ``harm_category`` — multi-class over the 6 harm categories;
* ``harmful`` / ``harmless`` — one pool each (labels 1 / 0).

Every prompt has a fixed split (train/val/test = 60/20/20, stratified by category and assigned from
a hash of its id), so a prompt is in the same split in every suite: a probe or an aligned model
trained on ``train`` never sees a ``test`` prompt of another suite.

Example::

    ps = mechsafe.data.load("harmful_vs_harmless")
    train = ps.split("train")
    local = mechsafe.data.load("my.jsonl", text_column="prompt", label_column="is_harmful")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mechsafe.errors import MechsafeError
from mechsafe.hub import require_hub

SUITES_DIR = Path(__file__).parent / "suites"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
HARM_CATEGORIES = ("ambiguous_dual_use", "jailbreak_roleplay", "fraud_financial", "toxicity_hate",
                   "violence_illegal", "privacy")
BUNDLED_SUITES = ("harmful_vs_harmless", "toxicity_vs_other_harm", "harm_category", "harmful", "harmless")


@dataclasses.dataclass
class PromptSet:
    """Labelled prompts with a fixed split per prompt."""

    name: str
    """Where the prompts came from (suite name, dataset name or file path)."""
    texts: list[str]
    """The prompts."""
    labels: np.ndarray
    """Integer class per prompt (index into ``label_names``)."""
    label_names: list[str]
    """Name of each class."""
    groups: list[str]
    """A grouping per prompt (harm category, source dataset...), used for out-of-distribution splits."""
    splits: list[str]
    """``train``, ``val`` or ``test`` per prompt."""
    ids: list[str]
    """A stable identifier per prompt."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra provenance (column mapping, dataset revision...)."""

    def __post_init__(self) -> None:
        n = len(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.labels) == len(self.groups) == len(self.splits) == len(self.ids) == n):
            raise MechsafeError("texts, labels, groups, splits and ids must have the same length")
        bad = set(self.splits) - set(SPLITS)
        if bad:
            raise MechsafeError(f"unknown split names {sorted(bad)}; use {', '.join(SPLITS)}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> "PromptSet":
        """The prompts at ``index`` (a list of positions or a boolean mask)."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PromptSet(name or self.name, pick(self.texts), self.labels[idx], list(self.label_names),
                         pick(self.groups), pick(self.splits), pick(self.ids), dict(self.meta))

    def split(self, which: str) -> "PromptSet":
        """Only the prompts of split ``which``."""
        if which not in SPLITS:
            raise MechsafeError(f"unknown split {which!r}; use {', '.join(SPLITS)}")
        return self.subset(np.array([s == which for s in self.splits], dtype=bool))

    def where(self, groups: Sequence[str]) -> "PromptSet":
        """Only the prompts whose group is in ``groups``."""
        unknown = set(groups) - set(self.groups)
        if unknown:
            raise MechsafeError(f"groups {sorted(unknown)} are not in {self.name}; available: {sorted(set(self.groups))}")
        keep = set(groups)
        return self.subset(np.array([g in keep for g in self.groups], dtype=bool))

    def fingerprint(self) -> str:
        """SHA-256 (short) of texts, labels, groups and splits: identifies the data in caches and runs."""
        h = hashlib.sha256()
        for t, y, g, s in zip(self.texts, self.labels.tolist(), self.groups, self.splits):
            h.update(json.dumps([t, y, g, s]).encode())
        return h.hexdigest()[:16]

    def require_classes(self, minimum: int = 2) -> None:
        """Raise unless the set is non-empty and has at least ``minimum`` classes."""
        if len(self) == 0:
            raise MechsafeError(f"dataset {self.name} is empty; check the file, filters and split")
        present = sorted(set(self.labels.tolist()))
        if len(present) < minimum:
            names = [self.label_names[i] for i in present]
            raise MechsafeError(f"dataset {self.name} has only class {names}; a probe needs at least {minimum} "
                                "classes (check the label column and label map)")

    def summary(self) -> dict[str, Any]:
        """Counts per split and class."""
        out: dict[str, Any] = {"name": self.name, "n": len(self), "fingerprint": self.fingerprint()}
        for s in SPLITS:
            labs = [int(y) for y, sp in zip(self.labels, self.splits) if sp == s]
            out[s] = {self.label_names[c]: labs.count(c) for c in range(len(self.label_names))}
        return out


def assign_splits(ids: Sequence[str], strata: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  seed: int = 0) -> list[str]:
    """Deterministic stratified train/val/test assignment from a hash of each id and the seed."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise MechsafeError(f"split fractions {list(fractions)} must be three non-negative numbers summing to 1")
    out = [""] * len(ids)
    by_stratum: dict[str, list[int]] = {}
    for i, s in enumerate(strata):
        by_stratum.setdefault(s, []).append(i)
    for members in by_stratum.values():
        order = sorted(members, key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest())
        n = len(order)
        n_train = int(round(fractions[0] * n))
        n_val = int(round(fractions[1] * n))
        for rank, i in enumerate(order):
            out[i] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


@lru_cache(maxsize=None)
def _read_suite(filename: str) -> tuple[dict[str, Any], ...]:
    path = SUITES_DIR / filename
    if not path.is_file():
        raise MechsafeError(f"bundled data file {path} is missing; reinstall mechsafe")
    with path.open(encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def _pool(kind: str) -> PromptSet:
    if kind == "harmful":
        rows = _read_suite("harmful.jsonl")
        groups = [r["category"] for r in rows]
        label, names = 1, ["harmless", "harmful"]
    else:
        rows = _read_suite("harmless.jsonl")
        groups = ["harmless"] * len(rows)
        label, names = 0, ["harmless", "harmful"]
    ids = [r["id"] for r in rows]
    forms = [r.get("form", "") for r in rows]
    splits = assign_splits(ids, [f"{g}|{f}" for g, f in zip(groups, forms)])
    return PromptSet(kind, [r["text"] for r in rows], [label] * len(rows), names, groups, splits, ids,
                     {"forms": forms})


def _concat(name: str, parts: Sequence[PromptSet], labels: Sequence[int], label_names: list[str]) -> PromptSet:
    texts, groups, splits, ids = [], [], [], []
    for p in parts:
        texts += p.texts
        groups += p.groups
        splits += p.splits
        ids += p.ids
    return PromptSet(name, texts, np.asarray(labels), label_names, groups, splits, ids, {"source": "bundled"})


def bundled(name: str) -> PromptSet:
    """A bundled suite by name (see the module docstring)."""
    harmful, harmless = _pool("harmful"), _pool("harmless")
    if name == "harmful_vs_harmless":
        return _concat(name, [harmless, harmful], [0] * len(harmless) + [1] * len(harmful), ["harmless", "harmful"])
    if name == "toxicity_vs_other_harm":
        labels = [int(g == "toxicity_hate") for g in harmful.groups]
        return _concat(name, [harmful], labels, ["other_harm", "toxicity_hate"])
    if name == "harm_category":
        labels = [HARM_CATEGORIES.index(g) for g in harmful.groups]
        return _concat(name, [harmful], labels, list(HARM_CATEGORIES))
    if name == "harmful":
        return _concat(name, [harmful], [1] * len(harmful), ["harmless", "harmful"])
    if name == "harmless":
        return _concat(name, [harmless], [0] * len(harmless), ["harmless", "harmful"])
    raise MechsafeError(f"unknown bundled suite {name!r}; choose one of {', '.join(BUNDLED_SUITES)}")


def prompt_pool(kind: str, split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """The bundled ``harmful`` or ``harmless`` prompts of one split as dicts ``id``, ``text``, ``form``.

    With ``limit``, a seeded subset balanced over the forms (question, instruction): each form gets
    ``limit // n_forms`` prompts, the first ``limit % n_forms`` forms (sorted) one more.
    """
    if kind not in ("harmful", "harmless"):
        raise MechsafeError(f"unknown prompt pool {kind!r}; use 'harmful' or 'harmless'")
    if split not in SPLITS:
        raise MechsafeError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    pool = _pool(kind)
    rows = [{"id": i, "text": t, "form": f} for i, t, f, s in zip(pool.ids, pool.texts, pool.meta["forms"], pool.splits)
            if s == split]
    if limit is None or limit >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    by_form: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_form.setdefault(r["form"], []).append(r)
    picked: list[dict[str, str]] = []
    forms = sorted(by_form)
    for k, form in enumerate(forms):
        n = limit // len(forms) + (1 if k < limit % len(forms) else 0)
        members = by_form[form]
        picked += [members[i] for i in sorted(rng.permutation(len(members))[:n])]
    return picked


def refusals() -> list[str]:
    """Bundled refusal responses (teacher-forcing targets for harmful prompts)."""
    return [r["text"] for r in _read_suite("refusals.jsonl")]


def compliances() -> list[str]:
    """Bundled compliant response openers (teacher-forcing targets of attacks)."""
    return [r["text"] for r in _read_suite("compliances.jsonl")]


def answer_prompts() -> list[dict[str, Any]]:
    """Bundled training-only harmless prompts (``id``, ``text``, ``topic``, ``form``): everyday requests,
    near-harm but benign requests and harmless role-play framings, for teaching a safety-tuned model
    what to keep answering. They belong to no evaluation split and share no prompt with the pools."""
    return [dict(r) for r in _read_suite("answer_prompts.jsonl")]


def refusal_prompts() -> list[dict[str, Any]]:
    """Bundled training-only harmful requests (``id``, ``text``, ``category``, ``form``) in the six harm
    categories, for teaching a safety-tuned model what to refuse beyond the TRAIN split. They belong to no
    evaluation split and share no prompt with the pools."""
    return [dict(r) for r in _read_suite("refusal_prompts.jsonl")]


def twin_prompts() -> list[dict[str, Any]]:
    """Bundled training-only benign twins of the harmful TRAIN prompts (``id``, ``text``, ``twin_of``,
    ``form``): each keeps one harmful prompt's form, length and framing (backstory, role-play, jailbreak-style
    wrapper, step-by-step phrasing) around a harmless request, for teaching a safety-tuned model to answer
    what only looks like a harmful request. They belong to no evaluation split and share no prompt with the pools."""
    return [dict(r) for r in _read_suite("twin_prompts.jsonl")]


def confirmation_prompts() -> list[dict[str, Any]]:
    """Bundled confirmation prompts (``id``, ``text``, ``kind``: ``harmful`` or ``harmless``, ``category``: a
    harm category or a topic, ``form``): requests to refuse and prompts to answer, written after every recipe of
    ``mechsafe align`` had been tried and filtered against every other bundled prompt, so that no model was
    trained, selected or evaluated on them before. They belong to no split: use them to check a comparison of
    models made on other prompts."""
    return [dict(r) for r in _read_suite("confirmation_prompts.jsonl")]


def math_problems() -> list[dict[str, Any]]:
    """Bundled arithmetic word problems: dicts with ``id``, ``question`` and numeric ``answer``."""
    return [dict(r) for r in _read_suite("math.jsonl")]


def instructions() -> list[dict[str, Any]]:
    """Bundled benign instructions with reference answers: dicts with ``id``, ``instruction``, ``answer``."""
    return [dict(r) for r in _read_suite("instructions.jsonl")]


# --- Hugging Face datasets -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HubDataset:
    """How to read one known Hugging Face dataset into a PromptSet."""

    path: str
    split: str
    text: Callable[[Mapping[str, Any]], str]
    label: Callable[[Mapping[str, Any]], int]
    label_names: tuple[str, str] = ("harmless", "harmful")
    group: Callable[[Mapping[str, Any]], str] | None = None
    config: str | None = None


HUB_DATASETS: dict[str, HubDataset] = {
    "LibrAI/do-not-answer": HubDataset("LibrAI/do-not-answer", "train", lambda r: r["question"], lambda r: 1,
                                       group=lambda r: str(r.get("risk_area", "do-not-answer"))),
    "walledai/AdvBench": HubDataset("walledai/AdvBench", "train", lambda r: r["prompt"], lambda r: 1),
    "PKU-Alignment/BeaverTails": HubDataset("PKU-Alignment/BeaverTails", "30k_test", lambda r: r["prompt"],
                                            lambda r: int(not r["is_safe"])),
    "tatsu-lab/alpaca": HubDataset("tatsu-lab/alpaca", "train",
                                   lambda r: (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")),
                                   lambda r: 0),
    "openai/gsm8k": HubDataset("openai/gsm8k", "test", lambda r: r["question"], lambda r: 0, config="main"),
}
"""Hub datasets known by name, with their text/label mapping."""


def load_hub(name: str, split: str | None = None, text_column: str | None = None,
             label_column: str | None = None, limit: int | None = None, seed: int = 0) -> PromptSet:
    """Load a Hugging Face dataset (needs the hub) as a PromptSet.

    Datasets in :data:`HUB_DATASETS` need no options; any other ``owner/name`` (e.g. the Galtea
    red-teaming set) needs ``text_column`` and ``label_column``.
    """
    spec = HUB_DATASETS.get(name)
    if spec is None:
        if not (text_column and label_column):
            raise MechsafeError(f"hub dataset {name!r} is not one mechsafe knows ({', '.join(HUB_DATASETS)}); "
                                "pass --text-column and --label-column to map its columns")
        spec = HubDataset(name, split or "train", lambda r: r[text_column], lambda r: r[label_column])
    require_hub(f"the dataset {name!r}", "when offline, export it to a local .jsonl/.csv/.parquet file and pass that "
                "path with --text-column")
    try:
        import datasets

        ds = datasets.load_dataset(spec.path, spec.config, split=split or spec.split)
    except Exception as exc:  # noqa: BLE001 - offline hubs raise several types
        raise MechsafeError(f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}); when offline, "
                            "export it to a local .jsonl/.csv/.parquet file and pass that path with --text-column") from None
    rows = list(ds)[: limit or None]
    if not rows:
        raise MechsafeError(f"hub dataset {name!r} has no rows in split {split or spec.split!r}; pick another split")
    try:
        texts = [str(spec.text(r)) for r in rows]
        raw = [spec.label(r) for r in rows]
    except KeyError as exc:
        raise MechsafeError(f"hub dataset {name!r} has no column {exc}; its columns are {list(rows[0])}") from None
    if name in HUB_DATASETS:
        label_names, labels = list(spec.label_names), [int(v) for v in raw]
    else:
        label_names = sorted({str(v) for v in raw})
        labels = [label_names.index(str(v)) for v in raw]
    ids = [f"{name}:{i}" for i in range(len(rows))]
    groups = [spec.group(r) if spec.group else name for r in rows]
    return PromptSet(name, texts, labels, label_names, groups,
                     assign_splits(ids, [str(y) for y in labels], seed=seed), ids, {"source": "hub"})


# --- local files -----------------------------------------------------------------------------

def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path)
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except ValueError as exc:
        raise MechsafeError(f"could not parse {path} ({exc}); check that it is valid {suffix[1:]}") from None
    raise MechsafeError(f"unsupported file type {suffix!r} for {path}; use .jsonl, .json, .csv or .parquet")


def load_file(path: str | Path, text_column: str = "text", label_column: str | None = "label",
              label_map: Mapping[Any, Any] | None = None, group_column: str | None = None,
              split_column: str | None = None, seed: int = 0) -> PromptSet:
    """Load a local table as a PromptSet.

    Args:
        path: ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file.
        text_column: column holding the prompt text.
        label_column: column holding the label; ``None``: an unlabelled file, one class named after the file.
        label_map: maps raw label values to class names (or integers); rows whose label is not a
            key are dropped (a filter). Without it, the distinct raw labels become the classes.
        group_column: column used as the group (e.g. category, for OOD splits).
        split_column: column holding ``train``/``val``/``test``; without it splits are assigned
            deterministically from row order and ``seed``, stratified by label.
    """
    path = Path(path)
    if not path.is_file():
        raise MechsafeError(f"data file {path} does not exist; check the path")
    df = _read_table(path)
    needed = [c for c in (text_column, label_column, group_column, split_column) if c]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise MechsafeError(f"{path} has no column {missing[0]!r}; its columns are {list(map(str, df.columns))} "
                            "(set --text-column/--label-column)")
    if label_column is None:
        if label_map:
            raise MechsafeError("a label map needs a label column; name it (--label-column)")
        df = df.assign(**{"__label__": path.stem})
        label_column = "__label__"
    if label_map:
        keep = df[label_column].map(lambda v: v in label_map or str(v) in label_map)
        df = df[keep.astype(bool)]
        raw = [label_map[v] if v in label_map else label_map[str(v)] for v in df[label_column]]
    else:
        raw = list(df[label_column])
    if len(df) == 0:
        raise MechsafeError(f"{path} has no rows (after the label filter); check the file and --label-map")
    if all(isinstance(v, (int, np.integer, bool, np.bool_)) for v in raw):
        label_names = [str(v) for v in sorted(set(int(v) for v in raw))]
        labels = [label_names.index(str(int(v))) for v in raw]
    else:
        label_names = sorted(set(str(v) for v in raw))
        labels = [label_names.index(str(v)) for v in raw]
    texts = [str(t) for t in df[text_column]]
    ids = [f"{path.name}:{i}" for i in range(len(texts))]
    groups = [str(g) for g in df[group_column]] if group_column else [path.stem] * len(texts)
    if split_column:
        splits = [str(s) for s in df[split_column]]
    else:
        splits = assign_splits(ids, [str(y) for y in labels], seed=seed)
    meta = {"source": "file", "text_column": text_column, "label_column": label_column,
            "label_map": dict(label_map) if label_map else None, "group_column": group_column}
    return PromptSet(str(path), texts, labels, label_names, groups, splits, ids, meta)


def load_texts(source: str, split: str = "test", text_column: str | None = None) -> tuple[list[str], str]:
    """Prompt texts to evaluate on, and a line saying where they came from.

    A bundled suite or hub dataset gives its ``split`` (``all``: every prompt). A local ``.jsonl``/``.json``/``.csv``/
    ``.parquet`` file needs only a text column (``text_column``, default ``text``), no labels: with a ``split`` column
    it gives the rows of ``split``, without one it is used whole (a file is not cut to a hashed split).
    """
    if split not in (*SPLITS, "all"):
        raise MechsafeError(f"unknown split {split!r}; use {', '.join(SPLITS)} or all")
    path = Path(source).expanduser()
    if source not in BUNDLED_SUITES and (path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
                                         or path.exists()):
        if not path.is_file():
            raise MechsafeError(f"data file {path} does not exist; check the path")
        df = _read_table(path)
        column = text_column or "text"
        if column not in df.columns:
            raise MechsafeError(f"{path} has no column {column!r}; its columns are {list(map(str, df.columns))} "
                                "(name the text column, e.g. --harmful-text-column prompt)")
        if "split" in df.columns and split != "all":
            df = df[df["split"].astype(str) == split]
            where = f"{path}, rows with split {split!r}"
        else:
            where = f"{path}, whole file" + ("" if split == "all" else " (no split column)")
        texts = [str(t) for t in df[column] if isinstance(t, str) and t.strip()]
        if not texts:
            raise MechsafeError(f"{where} is empty: it has no non-empty {column!r} text; check the file")
        return texts, f"{len(texts)} prompts from {where}"
    if text_column:
        raise MechsafeError(f"{source!r} is not a local file; a text column applies to files only")
    ps = load(source)
    if split != "all":
        ps = ps.split(split)
    if len(ps) == 0:
        raise MechsafeError(f"{source} has no prompts in split {split!r}; pick another split")
    return list(ps.texts), f"{len(ps)} prompts from {source}, split {split}"


def load_pairs(source: str, prompt_column: str = "prompt", response_column: str = "response",
               split: str = "train") -> tuple[list[tuple[str, str]], str]:
    """(prompt, response) pairs from a local .jsonl/.json/.csv/.parquet file or a Hugging Face dataset by name, and a
    line saying where they came from. Rows with an empty prompt or response are skipped; a hub dataset gives
    ``split``."""
    path = Path(source).expanduser()
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".parquet") or path.exists():
        if not path.is_file():
            raise MechsafeError(f"data file {path} does not exist; check the path")
        df = _read_table(path)
        columns, rows, where = list(map(str, df.columns)), df.to_dict("records"), str(path)
    else:
        if "/" not in source:
            raise MechsafeError(f"{source!r} is neither a local file nor a hub dataset name (owner/name); check it")
        require_hub(f"the dataset {source!r}", "when offline, export it to a local .jsonl/.csv/.parquet file and pass "
                    "that path")
        try:
            import datasets

            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:  # noqa: BLE001 - offline hubs raise several types
            raise MechsafeError(f"could not load {source!r} from the Hugging Face hub ({type(exc).__name__}); when "
                                "offline, export it to a local file and pass that path") from None
        columns, rows, where = list(ds.column_names), list(ds), f"{source}, split {split}"
    for column, flag in ((prompt_column, "--prompt-column"), (response_column, "--response-column")):
        if column not in columns:
            raise MechsafeError(f"{where} has no column {column!r}; its columns are {columns} (name it with {flag})")
    pairs = [(str(r[prompt_column]), str(r[response_column])) for r in rows
             if isinstance(r[prompt_column], str) and r[prompt_column].strip()
             and isinstance(r[response_column], str) and r[response_column].strip()]
    if not pairs:
        raise MechsafeError(f"{where} has no row with a non-empty {prompt_column!r} and {response_column!r}; check it")
    return pairs, f"{len(pairs)} pairs from {where}"


def load(source: str, **kwargs: Any) -> PromptSet:
    """Load a prompt set: a bundled suite name, a local file path, or a known hub dataset name.

    Keyword arguments go to :func:`load_file` (column mapping) or :func:`load_hub` (``limit``, ``seed``).
    """
    if source in BUNDLED_SUITES:
        if kwargs:
            raise MechsafeError(f"bundled suite {source!r} takes no column options ({sorted(kwargs)}); drop them")
        return bundled(source)
    path = Path(source).expanduser()
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv", ".parquet") or path.exists():
        return load_file(path, **kwargs)
    if source in HUB_DATASETS or source.count("/") == 1:
        return load_hub(source, **kwargs)
    raise MechsafeError(f"unknown dataset {source!r}; use a bundled suite ({', '.join(BUNDLED_SUITES)}), "
                        f"a hub dataset ({', '.join(HUB_DATASETS)}) or a local .jsonl/.csv/.parquet file")
