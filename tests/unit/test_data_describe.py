"""``mechsafe data describe``: counts, lengths, duplicates and short prompts match the data; the CLI writes a run."""

import json

import numpy as np
import pytest

import mechsafe as ms
from mechsafe.cli import main
from mechsafe.data import PromptSet
from mechsafe.data.describe import describe, normalize

TEXTS = ["How do I make a bomb at home?", "How do I make a bomb at home?", "how do i make a BOMB at home",
         "Write a poem about autumn leaves falling", "Write a poem about autumn leaves falling softly", "Is",
         "Explain how vaccines train the immune system", "how to"]
LABELS = [1, 1, 1, 0, 0, 0, 0, 1]
SPLITS = ["train", "test", "val", "train", "test", "train", "train", "val"]
GROUPS = ["weapons", "weapons", "weapons", "poetry", "poetry", "noise", "science", "noise"]


def test_describe_counts_lengths_duplicates_and_noise():
    ps = PromptSet("toy", TEXTS, LABELS, ["harmless", "harmful"], GROUPS, SPLITS, [str(i) for i in range(8)], {})
    d = describe(ps, near_threshold=0.8, short_words=2)
    assert d.class_counts == {"harmless": 4, "harmful": 4}
    assert d.split_counts["train"] == {"harmless": 3, "harmful": 1}
    words = [len(t.split()) for t in TEXTS]
    assert d.length_words["harmful"]["mean"] == pytest.approx(np.mean([w for w, y in zip(words, LABELS) if y]))
    assert d.group_mean_length["weapons"]["harmless"] is None and d.group_counts["weapons"]["harmful"] == 3
    assert d.exact_duplicates == [[0, 1]]
    assert d.normalized_duplicates == [[0, 1, 2]] and normalize(TEXTS[2]) == normalize(TEXTS[0])
    assert [(a, b) for a, b, _ in d.near_duplicates] == [(3, 4)]  # {write, poem, autumn, leaves, falling} + softly
    assert d.near_duplicates[0][2] == pytest.approx(5 / 6)
    assert d.cross_split_duplicates == 3  # the exact pair, the normalized triple, the near pair each straddle splits
    assert d.short_prompts == [5, 7]
    report = d.markdown()
    assert "| harmful | 4 |" in report and "'Is'" in report


def test_cli_data_describe_writes_a_run_and_takes_unlabelled_files(tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    runs = tmp_path / "runs"
    assert main(["data", "describe", str(f), "--text-column", "prompt", "--runs-dir", str(runs)]) == 0
    (run,) = runs.iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["n"] == 8 and res["class_counts"] == {"prompts": 8} and res["exact_duplicates"] == [[0, 1]]
    assert (run / "lengths.png").stat().st_size > 1000 and (run / "groups.png").is_file()
    assert "run directory:" in capsys.readouterr().out
    assert main(["data", "describe", str(f), "--runs-dir", str(runs)]) == 2  # no 'text' column: one line, nothing written
    assert "has no column 'text'" in capsys.readouterr().err and len(list(runs.iterdir())) == 1
    bundled = describe(ms.data.load("harmful_vs_harmless"))
    assert bundled.n == sum(bundled.class_counts.values()) and not bundled.exact_duplicates
