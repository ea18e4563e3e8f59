"""The utility task WaRP's comparison fine-tunes on, and its measures: exact-match accuracy and answer NLL.

Sources: ``arithmetic`` (:mod:`mechsafe.data.arithmetic`: generated word problems with worked solutions),
``openai/gsm8k`` (the hub, when reachable) or a local .jsonl/.csv/.parquet file with ``question`` and ``answer``
columns in GSM8K's layout (the final number after ``####``; the solution trained on is the answer text with
``#### N`` written as ``The answer is N.``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.evaluation.generation import generate
from mechsafe.evaluation.metrics import answer_nll, last_number
from mechsafe.stats import proportion

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def _gsm8k_rows(rows: Sequence[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows):
        q, a = r.get("question"), r.get("answer")
        if not (isinstance(q, str) and isinstance(a, str) and q.strip()):
            continue
        found = _FINAL.search(a)
        number = float(found.group(1).replace(",", "")) if found else last_number(a)
        if number is None:
            continue
        solution = _FINAL.sub(f"The answer is {found.group(1)}." if found else "", a).strip()
        out.append({"id": f"{where}:{i}", "question": q.strip(), "solution": solution, "answer": number})
    if not out:
        raise MechsafeError(f"{where} has no row with a question and a numeric answer (GSM8K layout: answer ending "
                            "'#### N'); check the columns")
    return out


def utility_problems(source: str, n_train: int, n_test: int, seed: int = 0
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Training and held-out problems (dicts ``question``, ``solution``, ``answer``) of ``source``, and where from."""
    from pathlib import Path

    if source == "arithmetic":
        from mechsafe.data.arithmetic import arithmetic_problems

        return (arithmetic_problems(n_train, "train", seed), arithmetic_problems(n_test, "test", seed),
                f"{n_train} generated arithmetic problems (train split), {n_test} held out (test split)")
    path = Path(source).expanduser()
    rng = np.random.default_rng(seed)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet") or path.exists():
        from mechsafe.data import _read_table

        if not path.is_file():
            raise MechsafeError(f"data file {path} does not exist; check the path")
        df = _read_table(path)
        for column in ("question", "answer"):
            if column not in df.columns:
                raise MechsafeError(f"{path} has no column {column!r}; its columns are {list(map(str, df.columns))} "
                                    "(a utility task needs question and answer)")
        rows = _gsm8k_rows(df.to_dict("records"), str(path))
        if "split" in df.columns:
            splits = [str(s) for s in df["split"]]
            train = [r for r in rows if splits[int(r["id"].rsplit(":", 1)[1])] == "train"]
            test = [r for r in rows if splits[int(r["id"].rsplit(":", 1)[1])] == "test"]
        else:
            order = rng.permutation(len(rows))
            cut = max(1, len(rows) // 5)
            test, train = [rows[i] for i in sorted(order[:cut])], [rows[i] for i in sorted(order[cut:])]
        where = str(path)
    elif source == "openai/gsm8k":
        from mechsafe.hub import require_hub

        require_hub("the dataset 'openai/gsm8k'", "when offline, export it to a local .jsonl file with question and "
                    "answer columns and pass that path")
        try:
            import datasets

            train = _gsm8k_rows(list(datasets.load_dataset(source, "main", split="train")), f"{source}:train")
            test = _gsm8k_rows(list(datasets.load_dataset(source, "main", split="test")), f"{source}:test")
        except MechsafeError:
            raise
        except Exception as exc:  # noqa: BLE001 - offline hubs raise several types
            raise MechsafeError(f"could not load {source!r} from the hub ({type(exc).__name__}); when offline, export "
                                "it to a local .jsonl file and pass that path") from None
        where = source
    else:
        raise MechsafeError(f"unknown utility task {source!r}; use arithmetic, openai/gsm8k or a local file with "
                            "question and answer columns")
    if not train or not test:
        raise MechsafeError(f"{where} gives no training or no held-out problems; add rows to both splits")
    pick = lambda rows, n: [rows[i] for i in sorted(rng.permutation(len(rows))[:n])]  # noqa: E731
    train, test = pick(train, n_train), pick(test, n_test)
    return train, test, f"{len(train)} training and {len(test)} held-out problems of {where}"


def training_pairs(problems: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(question, worked solution) pairs to fine-tune on."""
    return [(p["question"], p["solution"]) for p in problems]


def task_utility(model: HookedTransformer, problems: Sequence[dict[str, Any]], max_new_tokens: int = 40,
                 batch_size: int = 16) -> dict[str, Any]:
    """Exact-match accuracy (the last number of the greedy answer equals the answer; Wilson interval) and the NLL
    per token of the reference solutions (bootstrap interval) on held-out ``problems``."""
    questions = [p["question"] for p in problems]
    answers = generate(model, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    correct = []
    for p, a in zip(problems, answers):
        got = last_number(a)
        correct.append(got is not None and abs(got - float(p["answer"])) < 1e-6)
    nll = answer_nll(model, questions, [p["solution"] for p in problems], batch_size=batch_size)
    return {"accuracy": proportion(np.array(correct, dtype=bool)).to_dict(), "answer_nll": nll.to_dict(),
            "n": len(problems), "examples": [{"question": q, "answer": a} for q, a in list(zip(questions, answers))[:3]]}
