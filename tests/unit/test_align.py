"""The align recipe on tiny models: data mix, refusal assignment, answer cache, end-to-end run and CLI."""

import dataclasses
import json
import math

import pytest
import torch

import mechsafe as ms
from mechsafe import align as al
from mechsafe.cli import main
from mechsafe.data import refusals
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig
from mechsafe.models import model_info
from mechsafe.runs import read_json


def test_pool_prompts_mix_forms_and_respect_splits():
    train = al.pool_prompts("harmful", "train")
    test = al.pool_prompts("harmful", "test")
    assert {p["form"] for p in train} == {"question", "instruction"}
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    sub = al.pool_prompts("harmless", "val", limit=10, seed=3)
    assert len(sub) == 10 and sum(p["form"] == "question" for p in sub) == 5
    assert sub == al.pool_prompts("harmless", "val", limit=10, seed=3)
    with pytest.raises(MechsafeError, match="pool"):
        al.pool_prompts("neutral", "train")


def test_refusals_are_varied_deterministic_and_cycled():
    n = len(refusals())
    out = al.assign_refusals(2 * n + 3, seed=1)
    assert out == al.assign_refusals(2 * n + 3, seed=1)
    assert out != al.assign_refusals(2 * n + 3, seed=2)
    assert set(out[:n]) == set(refusals())  # one full pass before any repeat
    assert all(out.count(r) >= 2 for r in refusals())


def test_training_examples_cache_base_answers(tiny_model, tmp_path, monkeypatch):
    cfg = al.AlignConfig(harmful_limit=4, harmless_limit=4, answer_tokens=4, answer_prompts=False, refusal_prompts=False)
    pairs, mix = al.training_examples(cfg, tiny_model, tmp_path, progress=False)
    assert mix["harmful"] == {"question": 2, "instruction": 2, "refusal_prompts": 0}
    assert len(pairs) == 4 + sum(mix["harmless"].values())
    assert all(r in refusals() for _, r in pairs[:4])
    cached = json.loads((tmp_path / al.ANSWERS_FILE).read_text())["answers"]
    assert len(cached) == 4
    import mechsafe.evaluation as ev

    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("answers should come from the cache"))
    again, _ = al.training_examples(cfg, tiny_model, tmp_path, progress=False)
    assert again == pairs
    # a shorter token limit cuts the cached greedy answers instead of generating again
    prompts = al.pool_prompts("harmless", "train", 4, 0)
    short = al.base_answers(tiny_model, prompts, 2, tmp_path, progress=False)
    for p in prompts:
        full_ids = tiny_model.tokenizer(cached[p["id"]], add_special_tokens=False)["input_ids"]
        assert short[p["id"]] == tiny_model.tokenizer.decode(full_ids[:2], skip_special_tokens=True)


def test_utility_prompts_are_split_and_taught_when_asked(tiny_model, tmp_path):
    from mechsafe.data import instructions, math_problems

    train, test = al.utility_prompts("train"), al.utility_prompts("test")
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    assert {p["form"] for p in train} == {"utility"}
    texts = {r["instruction"] for r in instructions()} | {r["question"] for r in math_problems()}
    assert {p["text"] for p in train + test} <= texts
    cfg = al.AlignConfig(harmful_limit=2, harmless_limit=2, answer_tokens=3, utility_prompts=True,
                         answer_prompts=False, refusal_prompts=False)
    pairs, mix = al.training_examples(cfg, tiny_model, tmp_path, progress=False)
    taught = {prompt for prompt, *_ in pairs}
    kept = mix["harmless"]["utility"]
    assert kept == len({p["text"] for p in train} & taught) > 0
    assert len(pairs) == 2 + sum(mix["harmless"].values())


@pytest.mark.parametrize("kind", ["answer_prompts", "twin_prompts"])
def test_training_only_harmless_prompts_are_taught_only_when_asked(tiny_model, tmp_path, kind):
    cfg = al.AlignConfig(harmful_limit=2, harmless_limit=2, answer_tokens=3, answer_prompts=False, refusal_prompts=False)
    without, mix0 = al.training_examples(cfg, tiny_model, tmp_path, progress=False)
    extra = {r["text"] for r in getattr(ms.data, kind)()}
    assert mix0["harmless"][kind] == 0 and not {p for p, *_ in without} & extra
    pairs, mix = al.training_examples(dataclasses.replace(cfg, **{kind: True}), tiny_model, tmp_path,
                                      progress=False)
    taught = {prompt for prompt, *_ in pairs} & extra
    assert mix["harmless"][kind] == len(taught) > len(extra) // 2
    assert pairs[:len(without)] == without


def test_refusal_prompts_are_taught_refusals_after_the_train_pairs(tiny_model, tmp_path):
    cfg = al.AlignConfig(harmful_limit=2, harmless_limit=2, answer_tokens=3, answer_prompts=False, refusal_prompts=False)
    without, mix0 = al.training_examples(cfg, tiny_model, tmp_path, progress=False)
    pairs, mix = al.training_examples(dataclasses.replace(cfg, refusal_prompts=True), tiny_model, tmp_path,
                                      progress=False)
    extra = ms.data.refusal_prompts()
    assert mix0["harmful"]["refusal_prompts"] == 0 and mix["harmful"]["refusal_prompts"] == len(extra)
    assert pairs[:2] == without[:2] and pairs[2 + len(extra):] == without[2:]  # TRAIN pairs keep their targets
    refusals = set(ms.data.refusals())
    assert [p for p, _ in pairs[2:2 + len(extra)]] == [r["text"] for r in extra]
    assert all(r in refusals for _, r in pairs[2:2 + len(extra)])
    with pytest.raises(MechsafeError, match="training-only"):
        al.training_only_prompts("harmful")


def test_refusal_openings_are_the_first_words_of_bundled_refusals():
    openings = al.refusal_openings(100, 3, seed=1)
    starts = {" ".join(r.split()[:3]) for r in ms.data.refusals()}
    assert len(openings) == 100 and set(openings) <= starts and len(set(openings)) > 20
    assert all(len(o.split()) == 3 for o in openings) and openings == al.refusal_openings(100, 3, seed=1)
    first_words = al.refusal_openings(100, 1, seed=1)  # t41-t43's openings: "I", "I'm", "Sorry,", ...
    assert [o.split()[0] for o in openings] == first_words and all(len(o.split()) == 1 for o in first_words)


def test_config_validation():
    with pytest.raises(MechsafeError, match="eval_split"):
        al.AlignConfig(eval_split="train")
    with pytest.raises(MechsafeError, match="eval_limit"):
        al.AlignConfig(eval_limit=1)
    with pytest.raises(MechsafeError, match="harmless_repeat"):
        al.AlignConfig(harmless_repeat=0)
    with pytest.raises(MechsafeError, match="negative_words"):
        al.AlignConfig(negative_words=0)
    assert isinstance(al.AlignConfig(finetune={"steps": 3}).finetune, FinetuneConfig)


def test_harmless_repeat_duplicates_only_harmless_examples(tiny_model, tmp_path):
    cfg = al.AlignConfig(harmful_limit=2, harmless_limit=4, answer_tokens=3, answer_prompts=False, refusal_prompts=False)
    once, mix1 = al.training_examples(cfg, tiny_model, tmp_path, progress=False)
    thrice, mix3 = al.training_examples(dataclasses.replace(cfg, harmless_repeat=3), tiny_model, tmp_path,
                                        progress=False)
    harmless1, harmless3 = once[2:], thrice[2:]
    assert thrice[:2] == once[:2] and len(harmless1) > 0
    assert len(harmless3) == 3 * len(harmless1) and set(harmless3) == set(harmless1)
    assert mix3["harmless"] == mix1["harmless"] and mix3["harmless_cut_short"] == mix1["harmless_cut_short"]
    assert mix3["n_examples"] == 2 + 3 * len(harmless1)


def test_align_end_to_end_on_a_tiny_model(hf_dir, tmp_path):
    ft = FinetuneConfig(steps=3, batch_size=4, lr=1e-2, checkpoint_every=2, max_length=400, kl_weight=1.0,
                        unlikelihood_weight=1.0)
    cfg = al.AlignConfig(model=str(hf_dir), finetune=ft, harmful_limit=4, harmless_limit=4, answer_tokens=4,
                         answer_prompts=False, refusal_prompts=False,
                         eval_split="val", eval_limit=4, eval_max_new_tokens=4, utility=False)
    out = tmp_path / "aligned"
    result = al.align(cfg, out=out, run_dir=tmp_path / "run", progress=False)
    model = ms.load_model(str(out))
    extra = model_info(model).extra
    assert extra["base_model"] == str(hf_dir) and extra["run_dir"] == str((tmp_path / "run").resolve())
    assert extra["align_config"]["finetune"]["steps"] == 3
    for name in ("run.json", "eval.json", "report.md", "losses.json", "training_mix.json", al.ANSWERS_FILE):
        assert (tmp_path / "run" / name).is_file(), name
    assert len(result.losses) == 3
    # the retain and unlikelihood terms hold exactly the harmless pairs (they follow the harmful ones)
    mix, fin = read_json(tmp_path / "run" / "training_mix.json"), read_json(tmp_path / "run" / "finetune" / "run.json")
    assert fin["n_retain"] == fin["n_negatives"] == mix["n_examples"] - sum(mix["harmful"].values()) > 0
    losses = read_json(tmp_path / "run" / "losses.json")
    assert len(losses["retain_kl"]) == len(losses["unlikelihood"]) == 3
    ev = result.evaluation
    assert ev["split"] == "val" and ev["aligned"]["n_harmful"] == 4 and ev["base"]["n_harmless"] == 4
    assert 0 <= ev["aligned"]["refusal_rate"]["value"] <= 1 and ev["aligned"]["kl_harmless"] is not None
    assert set(ev["aligned"]["refusal_by_form"]) == {"question", "instruction"}
    assert "| refusal_rate |" in result.report
    # the fine-tuned weights differ from the base model's
    base = ms.load_model(str(hf_dir))
    assert not torch.equal(base.blocks[0].mlp.W_in, model.blocks[0].mlp.W_in)


def test_cli_rejects_bad_lora_overrides(capsys):
    assert main(["align", "--lora", '{"stepz": 3}']) == 2
    assert "unknown fields" in capsys.readouterr().err
    assert main(["align", "--lora", "not json"]) == 2


def test_cli_unknown_model_fails_before_writing_anything(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "aligned"
    assert main(["align", "--model", "no-such-model", "--runs-dir", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no-such-model'") and len(err.splitlines()) == 1
    assert not runs.exists() and not out.exists()


def test_preference_pairs_reject_compliance_on_harm_and_refusal_openings_elsewhere(hf_dir, tmp_path):
    ft = FinetuneConfig(steps=2, batch_size=4, lr=1e-2, max_length=400, preference_weight=1.0, unlikelihood_weight=1.0)
    cfg = al.AlignConfig(model=str(hf_dir), finetune=ft, harmful_limit=4, harmless_limit=4, answer_tokens=4,
                         answer_prompts=False, refusal_prompts=False,
                         eval_split="val", eval_limit=2, eval_max_new_tokens=2, utility=False)
    model = ms.load_model(str(hf_dir), processing="none")
    pairs, _ = al.training_examples(cfg, model, tmp_path, progress=False)
    harmful = al.harmful_training_prompts(cfg)
    openings = al.harmless_openings(cfg, len(harmful), len(pairs))
    rejected, counts = al.rejected_responses(cfg, model, tmp_path, openings, progress=False)
    answers = read_json(tmp_path / al.ANSWERS_FILE)["answers"]
    assert counts["harmful"] + counts["harmful_skipped_refused_or_empty"] == len(harmful) == 4
    for i, p in enumerate(harmful):  # a harmful pair's rejected response is the base model's own answer
        assert pairs[i][0] == p["text"]
        if i in rejected:
            assert rejected[i] == answers[p["id"]].strip()
    harmless = range(len(harmful), len(pairs))
    assert counts["harmless"] == len(harmless) > 0
    assert [rejected[i] for i in harmless] == al.refusal_openings(len(harmless), cfg.negative_words, cfg.seed)
    result = al.align(cfg, out=tmp_path / "aligned", run_dir=tmp_path / "run", progress=False)
    fin = read_json(tmp_path / "run" / "finetune" / "run.json")
    # every harmless pair's rejected response is its unlikelihood negative
    assert fin["n_rejected"] == len(rejected) == counts["harmful"] + fin["n_negatives"]
    assert read_json(tmp_path / "run" / "training_mix.json")["preference_pairs"] == counts
    losses = read_json(tmp_path / "run" / "losses.json")["preference"]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), rel=1e-4) and len(result.losses) == 2


def test_rejected_words_cuts_the_harmful_rejected_answers_to_their_opening_and_keeps_the_same_pairs(hf_dir, tmp_path):
    common = dict(model=str(hf_dir), finetune=FinetuneConfig(preference_weight=1.0), harmful_limit=4, harmless_limit=4,
                  answer_tokens=6, answer_prompts=False, refusal_prompts=False)
    model = ms.load_model(str(hf_dir), processing="none")
    full_cfg, cut_cfg = al.AlignConfig(**common), al.AlignConfig(rejected_words=2, **common)
    pairs, _ = al.training_examples(full_cfg, model, tmp_path, progress=False)
    openings = al.harmless_openings(full_cfg, 4, len(pairs))
    full, counts = al.rejected_responses(full_cfg, model, tmp_path, openings, progress=False)
    cut, cut_counts = al.rejected_responses(cut_cfg, model, tmp_path, openings, progress=False)
    assert cut_counts == counts and set(cut) == set(full)
    harmful = [i for i in full if i < 4]
    assert harmful and all(cut[i] == " ".join(full[i].split()[:2]) and len(cut[i].split()) <= 2 for i in harmful)
    assert any(len(full[i].split()) > 2 for i in harmful)  # the cut changed something
    assert all(cut[i] == full[i] for i in full if i >= 4)  # the harmless pairs' openings are untouched
    with pytest.raises(MechsafeError, match="rejected_words"):
        al.AlignConfig(rejected_words=0)


def test_answer_openings_give_every_harmful_pair_an_opening_no_refusal_starts_with():
    starts = {r.split()[0] for r in refusals()}
    assert {"I", "I'm"} <= starts and not {"The", "Sure,"} & starts
    harmful = [("harmful prompt", "refusal")] * 5
    harmless = [("q1", "The cat sat.", True), ("q2", "I'm glad you asked.", True), ("q3", "Sure, here it is.", False),
                ("q4", "I can do that.", True)]
    cfg = al.AlignConfig(negative_words=1, seed=3)
    out = al.answer_openings(cfg, harmful + harmless, 5)
    assert sorted(out) == list(range(5)) and set(out.values()) == {"The", "Sure,"}
    assert sorted(list(out.values()).count(w) for w in ("The", "Sure,")) == [2, 3]  # cycled: each used about equally
    assert out == al.answer_openings(cfg, harmful + harmless, 5)
    assert set(al.answer_openings(al.AlignConfig(negative_words=2), harmful + harmless, 5).values()) == {"The cat", "Sure, here"}
    with pytest.raises(MechsafeError, match="harmful_negatives"):
        al.answer_openings(cfg, harmful + harmless[1:2], 5)


def test_harmful_negatives_give_every_pair_a_negative_in_an_align_run(hf_dir, tmp_path):
    ft = FinetuneConfig(steps=1, batch_size=4, max_length=400, unlikelihood_weight=1.0)
    cfg = al.AlignConfig(model=str(hf_dir), finetune=ft, harmful_limit=4, harmless_limit=4, answer_tokens=4,
                         answer_prompts=False, refusal_prompts=False, harmful_negatives=True,
                         eval_split="val", eval_limit=2,
                         eval_max_new_tokens=2, utility=False)
    al.align(cfg, out=tmp_path / "aligned", run_dir=tmp_path / "run", progress=False)
    fin = read_json(tmp_path / "run" / "finetune" / "run.json")
    assert fin["n_negatives"] == read_json(tmp_path / "run" / "training_mix.json")["n_examples"]


def test_refusal_prompt_pairs_off_pairs_only_the_pool_prompts_and_generates_no_answers_for_the_others(hf_dir, tmp_path):
    ft = FinetuneConfig(steps=1, batch_size=4, max_length=400, preference_weight=1.0)
    common = dict(model=str(hf_dir), harmful_limit=4, harmless_limit=4, answer_tokens=4, answer_prompts=False,
                  refusal_prompts=True)
    model = ms.load_model(str(hf_dir), processing="none")
    out = {}
    for on in (True, False):
        cfg = al.AlignConfig(finetune=ft, refusal_prompt_pairs=on, **common)
        run = tmp_path / str(on)
        pairs, _ = al.training_examples(cfg, model, run, progress=False)
        harmful = al.harmful_training_prompts(cfg)
        openings = al.harmless_openings(cfg, len(harmful), len(pairs))
        rejected, counts = al.rejected_responses(cfg, model, run, openings, progress=False)
        answered = set(read_json(run / al.ANSWERS_FILE)["answers"])
        extra = {p["id"] for p in harmful if p["form"] == "refusal_prompts"}
        out[on] = (rejected, counts)
        if on:
            assert extra <= answered
        else:  # the training-only harmful requests are trained on their refusals but get no pair and no answer
            assert not extra & answered
            assert counts["harmful"] + counts["harmful_skipped_refused_or_empty"] == 4
            assert all(i < 4 or i >= len(harmful) for i in rejected)
    assert {i: r for i, r in out[True][0].items() if i < 4 or i >= len(harmful)} == out[False][0]


def test_recovery_examples_teach_the_refusal_after_an_opening_of_the_base_answer(hf_dir, tmp_path):
    ft = FinetuneConfig(steps=1, batch_size=4, max_length=400, kl_weight=1.0, unlikelihood_weight=1.0)
    cfg = al.AlignConfig(model=str(hf_dir), finetune=ft, harmful_limit=4, harmless_limit=4, answer_tokens=6,
                         answer_prompts=False, refusal_prompts=False, recovery_words=3, seed=1,
                         eval_split="val", eval_limit=2,
                         eval_max_new_tokens=2, utility=False)
    model = ms.load_model(str(hf_dir), processing="none")
    pairs, _ = al.training_examples(cfg, model, tmp_path, progress=False)
    answers, n_asked = al.harmful_answers(cfg, model, tmp_path, progress=False)
    assert n_asked == 4 and answers and set(answers) <= set(range(4))
    rec = al.recovery_examples(cfg, pairs, answers)
    assert rec == al.recovery_examples(cfg, pairs, answers)  # seeded
    assert len(rec) == len(answers)
    for (prompt, response, close, prefix), i in zip(rec, sorted(answers)):
        words = answers[i].split()
        assert prompt == pairs[i][0] and response == " " + pairs[i][1] and close
        assert 1 <= len(prefix.split()) <= 3 and prefix.split() == words[:len(prefix.split())]
    with pytest.raises(MechsafeError, match="recovery_words"):
        al.AlignConfig(recovery_words=-1)
    # in a run they come after the harmless pairs, and only the harmless pairs are retained and get negatives
    al.align(cfg, out=tmp_path / "aligned", run_dir=tmp_path / "run", progress=False)
    mix = read_json(tmp_path / "run" / "training_mix.json")
    fin = read_json(tmp_path / "run" / "finetune" / "run.json")
    assert mix["recovery_examples"] == len(rec) and mix["n_examples"] == len(pairs) + len(rec)
    assert fin["n_examples"] == mix["n_examples"] and fin["n_negatives"] == fin["n_retain"] == len(pairs) - 4
