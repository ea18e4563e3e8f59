"""Where SAE training text comes from, kept apart from the held-out evaluation prompts.

Sources: the bundled prompt suites (train/val splits only), optionally widened with the bundled
instructions, answers, math questions and responses; a Hugging Face dataset by name; a local
``.txt`` (one text per line) or ``.jsonl`` file. Any training text identical to a held-out
evaluation prompt is dropped, so evaluation never sees a trained-on prompt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mechsafe import data
from mechsafe.errors import MechsafeError
from mechsafe.sae.config import SAETrainConfig

logger = logging.getLogger(__name__)


def eval_prompts(config: SAETrainConfig) -> data.PromptSet:
    """The held-out evaluation prompts: split ``eval_split`` of ``eval_data``."""
    prompts = data.load(config.eval_data).split(config.eval_split)
    if len(prompts) == 0:
        raise MechsafeError(f"{config.eval_data} has no {config.eval_split!r} prompts to evaluate on; pick another eval_data")
    if config.eval_max_prompts is not None:
        prompts = prompts.subset(list(range(min(config.eval_max_prompts, len(prompts)))))
    return prompts


def _bundled_texts(config: SAETrainConfig) -> list[str]:
    texts: list[str] = []
    everything = data.load("harmful_vs_harmless")
    for split in ("train", "val", "test"):
        if split != config.eval_split:
            texts += everything.split(split).texts
    if config.extra_texts:
        texts += [r["instruction"] for r in data.instructions()]
        texts += [r["answer"] for r in data.instructions()]
        texts += [r["question"] for r in data.math_problems()]
        texts += data.refusals() + data.compliances()
    return texts


def _file_texts(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise MechsafeError(f"training text file {path} does not exist; check the path")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise MechsafeError(f"{path} line {n} is not valid JSON; fix the file") from None
                if not isinstance(row, dict) or column not in row:
                    raise MechsafeError(f"{path} line {n} has no {column!r} field; set text_column")
                texts.append(str(row[column]))
        return texts
    if path.suffix.lower() == ".txt":
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    raise MechsafeError(f"unsupported training text file {path.suffix!r}; use .txt (one text per line) or .jsonl")


def _hub_texts(name: str, column: str, limit: int | None) -> list[str]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train", streaming=True)
        rows = []
        for row in ds:
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    except Exception as exc:  # noqa: BLE001 - offline hubs raise several types
        raise MechsafeError(f"could not load {name!r} from the Hugging Face hub ({type(exc).__name__}); "
                            "when offline, pass a local .txt or .jsonl file as source") from None
    if rows and column not in rows[0]:
        raise MechsafeError(f"hub dataset {name!r} has no column {column!r}; its columns are {list(rows[0])}")
    return [str(r[column]) for r in rows]


def training_texts(config: SAETrainConfig) -> list[str]:
    """The training texts of ``config.source`` without held-out prompts or empty lines."""
    source = config.source
    if source == "bundled":
        texts = _bundled_texts(config)
    elif source.startswith("store:"):
        raise MechsafeError("source store:PATH holds activations, not texts; train_sae reads it directly")
    else:
        path = Path(source).expanduser()
        if path.suffix.lower() in (".txt", ".jsonl", ".ndjson") or path.exists():
            texts = _file_texts(path, config.text_column)
        elif source.count("/") == 1:
            texts = _hub_texts(source, config.text_column, config.max_texts)
        else:
            raise MechsafeError(f"unknown training source {source!r}; use bundled, a hub dataset name, "
                                "a local .txt/.jsonl file or store:PATH")
    held_out = set(eval_prompts(config).texts)
    kept = [t for t in dict.fromkeys(texts) if t.strip() and t not in held_out]
    dropped = len(texts) - len(kept)
    if dropped:
        logger.info("dropped %d empty, duplicate or held-out training texts", dropped)
    if config.max_texts is not None:
        kept = kept[: config.max_texts]
    if not kept:
        raise MechsafeError(f"training source {source!r} has no usable text; check the file or dataset")
    return kept
