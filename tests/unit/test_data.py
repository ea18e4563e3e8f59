import json

import numpy as np
import pytest

import mechsafe as ms
from mechsafe.data import HARM_CATEGORIES, assign_splits
from mechsafe.errors import MechsafeError


def test_bundled_suites_meet_the_spec():
    harmful, harmless = ms.data.load("harmful"), ms.data.load("harmless")
    assert len(harmless) >= 240
    for cat in HARM_CATEGORIES:
        assert harmful.groups.count(cat) >= 40
    forms = ms.data._pool("harmful").meta["forms"]
    assert {"question", "instruction"} <= set(forms)
    assert len(ms.data.math_problems()) >= 100 and all(isinstance(p["answer"], (int, float)) for p in ms.data.math_problems())
    assert len(ms.data.refusals()) >= 20 and len(ms.data.compliances()) >= 20 and len(ms.data.instructions()) >= 50
    assert not set(harmful.texts) & set(harmless.texts)


def _content_words(text):
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return {w for w in words if len(w) > 2 and w not in ENGLISH_STOP_WORDS}


@pytest.mark.parametrize("kind, n_min, max_overlap",
                         [("answer_prompts", 250, 0.5), ("twin_prompts", 150, 0.5), ("refusal_prompts", 150, 1 / 3)])
def test_training_only_prompts_are_disjoint_from_the_evaluation_pools(kind, n_min, max_overlap):
    extra = getattr(ms.data, kind)()
    assert len(extra) >= n_min and len({r["id"] for r in extra}) == len(extra)
    assert {r["form"] for r in extra} == {"question", "instruction"} and all(r["text"].strip() for r in extra)
    harmful, harmless = ms.data.load("harmful"), ms.data.load("harmless")
    held_out = [_content_words(t) for ps in (harmful, harmless) for t, s in zip(ps.texts, ps.splits) if s != "train"]
    assert not {r["text"] for r in extra} & set(harmful.texts + harmless.texts)
    for r in extra:  # shares under max_overlap of its content words with every VAL/TEST prompt
        w = _content_words(r["text"])
        assert max(len(w & h) / min(len(w), len(h)) for h in held_out) < max_overlap, r["id"]


def _stem_words(text):
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in _content_words(text)}


def _near(a, b):
    """The confirmation set's filter: two prompts share at least three content words (a plural "s" dropped) and
    half of the shorter one's, or every content word of the shorter one (at least two)."""
    shared, short = len(a & b), min(len(a), len(b))
    return (shared >= 3 and shared >= short / 2) or (shared >= 2 and shared == short)


def test_confirmation_prompts_are_fresh():
    conf = ms.data.confirmation_prompts()
    harmful = [r for r in conf if r["kind"] == "harmful"]
    harmless = [r for r in conf if r["kind"] == "harmless"]
    assert len(harmful) >= 140 and len(harmless) >= 140 and len(harmful) + len(harmless) == len(conf)
    assert len({r["id"] for r in conf}) == len(conf) and {r["form"] for r in conf} == {"question", "instruction"}
    assert {r["category"] for r in harmful} == set(HARM_CATEGORIES)
    bundled = ms.data.load("harmful").texts + ms.data.load("harmless").texts
    bundled += [r["text"] for f in (ms.data.answer_prompts, ms.data.refusal_prompts, ms.data.twin_prompts) for r in f()]
    bundled += [r["instruction"] for r in ms.data.instructions()] + [r["question"] for r in ms.data.math_problems()]
    others = [_stem_words(t) for t in bundled]
    words = [_stem_words(r["text"]) for r in conf]
    for i, (r, w) in enumerate(zip(conf, words)):  # near no other bundled prompt and no earlier confirmation prompt
        assert not any(_near(w, o) for o in others + words[:i]), r["id"]


def test_twin_prompts_are_twins_of_harmful_train_prompts_in_the_same_form():
    from mechsafe.data import prompt_pool as pool_prompts

    train_form = {r["id"]: r["form"] for r in pool_prompts("harmful", "train")}
    twins = ms.data.twin_prompts()
    assert all(train_form[r["twin_of"]] == r["form"] for r in twins)
    assert len({r["twin_of"] for r in twins}) == len(twins)  # one twin per harmful prompt at most


def test_splits_are_deterministic_stratified_and_shared_across_suites():
    a, b = ms.data.load("harmful_vs_harmless"), ms.data.load("harmful_vs_harmless")
    assert a.splits == b.splits and a.fingerprint() == b.fingerprint()
    split_of = dict(zip(a.ids, a.splits))
    tox = ms.data.load("toxicity_vs_other_harm")
    assert all(split_of[i] == s for i, s in zip(tox.ids, tox.splits))
    for cat in HARM_CATEGORIES:  # every category is in every split, ~60/20/20
        sp = [s for g, s in zip(a.groups, a.splits) if g == cat]
        assert 0.5 < sp.count("train") / len(sp) < 0.7 and sp.count("test") >= 5


def test_assign_splits_fractions():
    ids = [f"x{i}" for i in range(100)]
    sp = assign_splits(ids, ["a"] * 100, (0.6, 0.2, 0.2), seed=0)
    assert (sp.count("train"), sp.count("val"), sp.count("test")) == (60, 20, 20)
    assert assign_splits(ids, ["a"] * 100, seed=1) != sp
    with pytest.raises(MechsafeError):
        assign_splits(ids, ["a"] * 100, (0.5, 0.2, 0.2))


def test_local_jsonl_with_column_mapping_and_filter(tmp_path):
    rows = [{"prompt": f"p{i}", "y": ["unsafe", "safe", "skip"][i % 3], "cat": f"c{i % 2}"} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ps = ms.data.load(str(path), text_column="prompt", label_column="y", label_map={"unsafe": "harmful", "safe": "harmless"},
                      group_column="cat")
    assert len(ps) == 20 and ps.label_names == ["harmful", "harmless"]
    assert set(ps.groups) == {"c0", "c1"}
    ps.require_classes(2)


def test_local_csv_and_parquet(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": [0, 1] * 5})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        ps = ms.data.load(str(tmp_path / name))
        assert ps.label_names == ["0", "1"] and list(ps.labels) == [0, 1] * 5


def test_bad_data_gets_one_line_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    with pytest.raises(MechsafeError, match="no column 'prompt'"):
        ms.data.load(str(path), text_column="prompt")
    with pytest.raises(MechsafeError, match="only class"):
        ms.data.load(str(path)).require_classes(2)
    with pytest.raises(MechsafeError, match="no rows"):
        ms.data.load(str(path), label_map={"x": 1})
    with pytest.raises(MechsafeError, match="does not exist"):
        ms.data.load(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MechsafeError, match="unknown dataset"):
        ms.data.load("no_such_suite")
    empty = ms.data.load("harmful").subset(np.array([], dtype=int))
    with pytest.raises(MechsafeError, match="empty"):
        empty.require_classes(1)


def test_hub_dataset_offline_suggests_local_file(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MechsafeError, match="local .jsonl"):
        ms.data.load("walledai/AdvBench")
    with pytest.raises(MechsafeError, match="--text-column"):
        ms.data.load("someone/unknown-set")
