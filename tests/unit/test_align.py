"""The align recipe on tiny models: data mix, objectives, answer cache, end-to-end run, CLI and the built spec."""

import json
import math

import pytest
import torch

import mechsafe as ms
from mechsafe import align as al
from mechsafe.cli import main
from mechsafe.data import prompt_pool, refusals
from mechsafe.errors import MechsafeError
from mechsafe.evaluation import cached_answers
from mechsafe.finetune import FinetuneConfig, Preference, ResponseNLL, RetainKL, Unlikelihood
from mechsafe.models import model_info
from mechsafe.runs import read_json

SMALL = dict(harmful_limit=4, harmless_limit=4, answer_tokens=4, answer_prompts=False, refusal_prompts=False)


def test_prompt_pools_mix_forms_and_respect_splits():
    train = prompt_pool("harmful", "train")
    test = prompt_pool("harmful", "test")
    assert {p["form"] for p in train} == {"question", "instruction"}
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    sub = prompt_pool("harmless", "val", limit=10, seed=3)
    assert len(sub) == 10 and sum(p["form"] == "question" for p in sub) == 5
    assert sub == prompt_pool("harmless", "val", limit=10, seed=3)
    with pytest.raises(MechsafeError, match="pool"):
        prompt_pool("neutral", "train")
    with pytest.raises(MechsafeError, match="split"):
        prompt_pool("harmful", "dev")


def test_refusals_are_varied_deterministic_and_cycled():
    n = len(refusals())
    out = al.assign_refusals(2 * n + 3, seed=1)
    assert out == al.assign_refusals(2 * n + 3, seed=1)
    assert out != al.assign_refusals(2 * n + 3, seed=2)
    assert set(out[:n]) == set(refusals())  # one full pass before any repeat
    assert all(out.count(r) >= 2 for r in refusals())


def test_objectives_of_the_recipe_and_their_cached_base_answers(tiny_model, tmp_path, monkeypatch):
    cfg = al.AlignConfig(**SMALL)
    objectives, mix = al.training_objectives(cfg, tiny_model, tmp_path, progress=False)
    nll, retain, unlikely, pref = objectives
    assert [type(o) for o in objectives] == [ResponseNLL, RetainKL, Unlikelihood, Preference]
    assert [o.weight for o in objectives] == [1.0, cfg.retain_weight, cfg.unlikelihood_weight, cfg.preference_weight]
    assert mix["harmful"] == {"question": 2, "instruction": 2, "refusal_prompts": 0}
    harmful, harmless = nll.examples[:4], nll.examples[4:]
    assert len(harmless) == sum(mix["harmless"].values()) > 0 and mix["n_examples"] == len(nll.examples)
    assert [e[0] for e in harmful] == [p["text"] for p in al.harmful_training_prompts(cfg)]
    assert all(e[1] in refusals() for e in harmful)
    # the retain and unlikelihood terms hold exactly the harmless examples; the negatives are refusal openings
    assert retain.examples == unlikely.examples == harmless
    assert unlikely.alternatives == al.refusal_openings(len(harmless), cfg.negative_words, cfg.seed)
    # the preference term: harmful refusals over the base model's own answers, then the harmless answers over the
    # refusal openings
    answers = read_json(tmp_path / al.ANSWERS_FILE)["answers"]
    n_pairs = mix["preference_pairs"]["harmful"]
    assert pref.examples[n_pairs:] == harmless and pref.alternatives[n_pairs:] == unlikely.alternatives
    by_text = {p["text"]: answers[p["id"]].strip() for p in al.harmful_training_prompts(cfg)}
    assert all(pref.alternatives[j] == by_text[pref.examples[j][0]] for j in range(n_pairs))
    assert n_pairs + mix["preference_pairs"]["harmful_skipped_refused_or_empty"] == 4
    assert len(answers) == 8  # harmless and harmful prompts answered once each, cached

    import mechsafe.evaluation.generation as gen

    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("answers should come from the cache"))
    again, _ = al.training_objectives(cfg, tiny_model, tmp_path, progress=False)
    assert [o.describe() for o in again] == [o.describe() for o in objectives]
    # a shorter token limit cuts the cached greedy answers instead of generating again
    prompts = prompt_pool("harmless", "train", 4, 0)
    short = cached_answers(tiny_model, prompts, 2, tmp_path / al.ANSWERS_FILE, progress=False)
    for p in prompts:
        full_ids = tiny_model.tokenizer(answers[p["id"]], add_special_tokens=False)["input_ids"]
        assert short[p["id"]] == tiny_model.tokenizer.decode(full_ids[:2], skip_special_tokens=True)


def test_zero_weights_leave_their_objectives_out(tiny_model, tmp_path):
    cfg = al.AlignConfig(**SMALL, retain_weight=0.0, unlikelihood_weight=0.0, preference_weight=0.0)
    objectives, mix = al.training_objectives(cfg, tiny_model, tmp_path, progress=False)
    assert [type(o) for o in objectives] == [ResponseNLL] and "preference_pairs" not in mix
    assert len(read_json(tmp_path / al.ANSWERS_FILE)["answers"]) == 4  # no harmful answers generated


def test_training_only_prompts_are_taught_after_the_train_pairs(tiny_model, tmp_path):
    small = SMALL | dict(harmful_limit=2, harmless_limit=2, preference_weight=0.0)
    (without, *_), mix0 = al.training_objectives(al.AlignConfig(**small), tiny_model, tmp_path, progress=False)
    on = small | dict(refusal_prompts=True, answer_prompts=True)
    (pairs, *_), mix = al.training_objectives(al.AlignConfig(**on), tiny_model, tmp_path, progress=False)
    extra = ms.data.refusal_prompts()
    assert mix0["harmful"]["refusal_prompts"] == 0 and mix["harmful"]["refusal_prompts"] == len(extra)
    assert pairs.examples[:2] == without.examples[:2]  # TRAIN pairs keep their targets
    assert [e[0] for e in pairs.examples[2:2 + len(extra)]] == [r["text"] for r in extra]
    assert all(e[1] in set(refusals()) for e in pairs.examples[2:2 + len(extra)])
    answer_texts = {r["text"] for r in ms.data.answer_prompts()}
    taught = {e[0] for e in pairs.examples} & answer_texts
    assert mix["harmless"]["answer_prompts"] == len(taught) > len(answer_texts) // 2
    assert mix0["harmless"]["answer_prompts"] == 0


def test_refusal_openings_are_the_first_words_of_bundled_refusals():
    openings = al.refusal_openings(100, 3, seed=1)
    starts = {" ".join(r.split()[:3]) for r in ms.data.refusals()}
    assert len(openings) == 100 and set(openings) <= starts and len(set(openings)) > 20
    assert all(len(o.split()) == 3 for o in openings) and openings == al.refusal_openings(100, 3, seed=1)
    first_words = al.refusal_openings(100, 1, seed=1)
    assert [o.split()[0] for o in openings] == first_words and all(len(o.split()) == 1 for o in first_words)


def test_config_validation():
    with pytest.raises(MechsafeError, match="eval_split"):
        al.AlignConfig(eval_split="train")
    with pytest.raises(MechsafeError, match="eval_limit"):
        al.AlignConfig(eval_limit=1)
    with pytest.raises(MechsafeError, match="negative_words"):
        al.AlignConfig(negative_words=0)
    with pytest.raises(MechsafeError, match="retain_weight"):
        al.AlignConfig(retain_weight=-1.0)
    with pytest.raises(MechsafeError, match="preference_beta"):
        al.AlignConfig(preference_beta=0.0)
    assert isinstance(al.AlignConfig(finetune={"steps": 3}).finetune, FinetuneConfig)


def test_align_end_to_end_on_a_tiny_model(hf_dir, tmp_path):
    ft = FinetuneConfig(steps=3, batch_size=4, lr=1e-2, checkpoint_every=2, max_length=400)
    cfg = al.AlignConfig(model=str(hf_dir), finetune=ft, **SMALL, eval_split="val", eval_limit=4,
                         eval_max_new_tokens=4, utility=False)
    out = tmp_path / "aligned"
    result = al.align(cfg, out=out, run_dir=tmp_path / "run", progress=False)
    model = ms.load_model(str(out))
    extra = model_info(model).extra
    assert extra["base_model"] == str(hf_dir) and extra["run_dir"] == str((tmp_path / "run").resolve())
    assert extra["align_config"]["finetune"]["steps"] == 3
    for name in ("run.json", "eval.json", "report.md", "losses.json", "training_mix.json", al.ANSWERS_FILE):
        assert (tmp_path / "run" / name).is_file(), name
    assert len(result.losses) == 3
    fin = read_json(tmp_path / "run" / "finetune" / "run.json")
    assert [o["name"] for o in fin["objectives"]] == ["nll", "retain_kl", "unlikelihood", "preference"]
    losses = read_json(tmp_path / "run" / "losses.json")
    assert len(losses["terms"]["preference"]) == 3
    first = [t for t in losses["terms"]["preference"] if t is not None][0]
    assert first == pytest.approx(math.log(2), rel=1e-4)  # every margin starts at 0
    ev = result.evaluation
    assert ev["split"] == "val" and ev["aligned"]["n_harmful"] == 4 and ev["base"]["n_harmless"] == 4
    flags = [s["refused"] for s in ev["aligned"]["samples"] if s["set"] == "harmful"]
    assert ev["aligned"]["refusal_rate"]["value"] == pytest.approx(sum(flags) / len(flags))
    assert set(ev["aligned"]["refusal_by_form"]) == {"question", "instruction"}
    assert "| refusal_rate |" in result.report
    base = ms.load_model(str(hf_dir))  # the fine-tuned weights differ from the base model's
    assert not torch.equal(base.blocks[0].mlp.W_in, model.blocks[0].mlp.W_in)


def test_cli_rejects_bad_lora_overrides(capsys):
    assert main(["align", "--lora", '{"stepz": 3}']) == 2
    assert "unknown --lora field 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["align", "--lora", "not json"]) == 2


def test_cli_unknown_model_fails_before_writing_anything(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "aligned"
    assert main(["align", "--model", "no-such-model", "--runs-dir", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no-such-model'") and len(err.splitlines()) == 1
    assert not runs.exists() and not out.exists()


def test_the_aligned_spec_is_built_once_then_loaded_from_the_cache(hf_dir, tmp_path, monkeypatch):
    """``load_model("smollm2-135m-aligned")`` builds the recipe on first use (here a tiny recipe on the tiny
    model), caches it keyed by recipe and code, resumes an interrupted build, and loads the cache afterwards."""
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    ft = FinetuneConfig(steps=4, batch_size=4, lr=1e-2, checkpoint_every=2, max_length=400)
    tiny = al.AlignConfig(model=str(hf_dir), finetune=ft, **SMALL)
    monkeypatch.setattr(al.run, "AlignConfig", lambda: tiny)
    calls = []
    real_train = al.run.train

    def crash_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first build is interrupted after its step-2 checkpoint
            def stop(step, model):
                if step == 3:
                    raise KeyboardInterrupt
            monkeypatch.setattr(al.run, "finetune", lambda *a, **k: ms.finetune.finetune(*a, callback=stop, **k))
        else:
            monkeypatch.setattr(al.run, "finetune", ms.finetune.finetune)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(al.run, "train", crash_once)
    with pytest.raises(KeyboardInterrupt):
        ms.load_model(al.ALIGNED_SPEC)
    assert not list((tmp_path / "cache" / "models").glob(f"{al.ALIGNED_SPEC}-*"))  # nothing that looks complete
    model = ms.load_model(al.ALIGNED_SPEC)
    info = model_info(model)
    assert info.spec == al.ALIGNED_SPEC and info.source == "built" and info.processing == "none"
    assert info.extra["base_model"] == str(hf_dir) and info.extra["align_config"]["finetune"]["steps"] == 4
    fin = read_json(next((tmp_path / "cache" / "builds").iterdir()) / "finetune" / "run.json")
    assert fin["resumed_from"] == 2 and fin["steps"] == 4
    monkeypatch.setattr(al.run, "train", lambda *a, **k: pytest.fail("a cached build must not train again"))
    again = ms.load_model(al.ALIGNED_SPEC, processing="fold")
    assert model_info(again).checkpoint == info.checkpoint and len(calls) == 2
    # the FLOPs that built it: the reference passes once plus 4 counted steps, kept so a second call counts nothing
    from mechsafe.attacks import bench

    base = ms.load_model(str(hf_dir), processing="none")
    objectives, _ = al.training_objectives(tiny, base, tmp_path / "ref", progress=False)
    clean = {n: p.detach().clone() for n, p in base.named_parameters()}
    setup, step = bench.setup_and_one_step(base, clean, objectives, ft)
    assert setup > 0 and step > 0
    assert bench.align_build_flops(model, base, count=False) is None  # nothing kept yet
    assert bench.align_build_flops(model, base) == setup + 4 * step
    assert bench.align_build_flops(model, base, count=False) == setup + 4 * step
    monkeypatch.setattr(bench, "setup_and_one_step", lambda *a: pytest.fail("the count should come from the cache"))
    assert bench.align_build_flops(model, base) == setup + 4 * step
    assert bench.align_build_flops(base, base) is None  # not a mechsafe align build
    # another recipe is another cache entry
    assert al.run.code_fingerprint() == al.run.code_fingerprint()
    assert json.dumps(tiny.to_dict()) != json.dumps(al.AlignConfig().to_dict())


def test_the_code_fingerprint_ignores_documentation_and_follows_code(tmp_path):
    from mechsafe.align.run import _code

    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text('"""Module."""\n\ndef f(x):\n    """Double."""\n    return 2 * x  # twice\n')
    b.write_text('"""Another text."""\n\n\ndef f(x):\n    """Twice x."""\n\n    return 2 * x\n')
    c.write_text('"""Module."""\n\ndef f(x):\n    """Double."""\n    return 3 * x\n')
    assert _code(a) == _code(b) != _code(c)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    assert _code(data) == data.read_bytes()


def test_the_code_fingerprint_follows_only_code_the_recipe_reaches(tmp_path, monkeypatch):
    import shutil

    import mechsafe.align.run as run

    package = tmp_path / "mechsafe"
    shutil.copytree(run._PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(run, "_PACKAGE", package)
    base = run.code_fingerprint()
    weights = package / "weights.py"
    weights.write_text(weights.read_text() + "\n\ndef an_unrelated_helper(x):\n    return x + 1\n")
    assert run.code_fingerprint() == base  # new code the recipe never calls keeps the cached model
    source = weights.read_text()
    assert "def check_kinds" in source
    weights.write_text(source.replace("kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)",
                                      "kinds = (kinds,) if isinstance(kinds, str) else tuple(sorted(kinds))"))
    assert run.code_fingerprint() != base  # a function the trainer reaches (through weights.select) counts
    suites = package / "data" / "suites" / "refusals.jsonl"
    weights.write_text(source)
    assert run.code_fingerprint() == base
    suites.write_text(suites.read_text() + '{"text": "one more"}\n')
    assert run.code_fingerprint() != base


def test_cli_flags_are_the_config_fields(capsys):
    from mechsafe.cli import build_parser
    from mechsafe.cli.common import config_values

    args = build_parser().parse_args(["align", "--harmful-limit", "4", "--eval-limit", "none", "--preference-weight",
                                      "0", "--no-utility", "--eval-split", "val", "--seed", "3"])
    values = config_values(al.AlignConfig, args)
    assert values == {"harmful_limit": 4, "eval_limit": None, "preference_weight": 0.0, "utility": False,
                      "eval_split": "val", "seed": 3}  # only what was written; the rest keeps the recipe's defaults
    cfg = al.AlignConfig(**values)
    assert cfg.answer_tokens == al.AlignConfig().answer_tokens and cfg.preference_weight == 0.0
    assert main(["align", "--harmful-limit", "four"]) == 2
    assert "--harmful-limit expects an integer, got 'four'" in capsys.readouterr().err
