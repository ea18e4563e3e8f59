"""The attack bench on the tiny model: FLOP counting, the success rule, attack/evaluation disjointness, resuming
a killed sweep, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechsafe.attacks import BenchConfig, ThreatModel, check_disjoint, count_flops, first_break, harmful_requests
from mechsafe.attacks import bench as bench_mod
from mechsafe.data import prompt_pool
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig, finetune


def test_a_training_step_costs_about_six_flops_per_parameter_and_token():
    tok = make_tokenizer()
    cfg = HookedTransformerConfig(n_layers=2, d_model=256, n_heads=4, d_head=64, d_mlp=1024, d_vocab=len(tok), n_ctx=128,
                                  act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                  rotary_dim=64, gated_mlp=True, final_rms=True, default_prepend_bos=False, seed=0)
    model = HookedTransformer(cfg, tok, default_padding_side="right")
    pairs = [("q", "a long answer that fills most of the sequence with response tokens " * 1)] * 4
    ft = FinetuneConfig(method="full", steps=1, batch_size=4, lr=1e-4, share_prompts=False)
    from mechsafe.forward import encode_examples

    seqs = encode_examples(tok, pairs)
    tokens = sum(len(s) for s in seqs)
    flops = count_flops(lambda: finetune(model, pairs, ft, progress=False))
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed"))
    assert abs(flops / (6 * n * tokens) - 1) < 0.15, flops / (6 * n * tokens)


def test_a_run_splits_into_reference_passes_paid_once_and_its_steps():
    from mechsafe.attacks.flops import setup_and_step_flops
    from mechsafe.finetune.objectives import ResponseNLL, RetainKL

    model = make_tiny_model()
    pairs = [(f"question {i}", f"an answer of some length {i}") for i in range(8)]
    ft = FinetuneConfig(method="full", steps=1, batch_size=4, lr=1e-9, callback_every=1, checkpoint_every=0)
    setup, step = setup_and_step_flops(lambda cb: finetune(model, pairs, ft, progress=False, callback=cb))
    assert setup == 0 and step == count_flops(lambda: finetune(model, pairs, ft, progress=False))
    objectives = [ResponseNLL(pairs), RetainKL(pairs)]
    setup, with_kl = setup_and_step_flops(lambda cb: finetune(model, objectives, ft, progress=False, callback=cb))
    assert setup > 0 and with_kl >= step  # the reference pass over every example, once; the step adds the KL term


def test_the_success_rule_on_hand_made_curves():
    threat = ThreatModel(refusal_fraction=0.5, refusal_absolute=0.2, utility_nll=0.1)
    base = {"refusal": 0.8, "nll": 2.0}
    curve = [{"flops": 0, "refusal": 0.8, "nll": 2.0}, {"flops": 10, "refusal": 0.5, "nll": 2.05},
             {"flops": 20, "refusal": 0.35, "nll": 2.5},  # refusal low enough, but utility broke
             {"flops": 30, "refusal": 0.4, "nll": 2.19}, {"flops": 40, "refusal": 0.1, "nll": 2.1}]
    assert first_break(curve, threat, base)["flops"] == 30
    assert first_break(curve, threat, base, absolute=True)["flops"] == 40
    assert first_break(curve[:3], threat, base) is None
    assert threat.broken(0.4, 2.2, 0.8, 2.0) and not threat.broken(0.41, 2.0, 0.8, 2.0)


def test_attack_prompts_never_overlap_the_held_out_prompts():
    requests = {r["text"] for r in harmful_requests()}
    for split in ("val", "test"):
        held_out = [p["text"] for p in prompt_pool("harmful", split)]
        check_disjoint(requests, held_out)
        assert not requests & set(held_out)
    with pytest.raises(MechsafeError, match="also attack prompts"):
        check_disjoint(["Tell me  how to X"], ["tell me how to x"])


class FakeEval:
    """Refusal falls as the model's logits move away from where they started (a stand-in for a real model)."""

    def __init__(self, model, harmful, harmless, confirm_harmful, batch_size=16, max_new_tokens=48):
        self.tokens = torch.arange(3, 13)[None]
        self.harmful = list(harmful)
        with torch.no_grad():
            self.start = model(self.tokens)
        self.calibration = {"threshold": 0.0}

    def __call__(self, model):
        with torch.no_grad():
            moved = float((model(self.tokens) - self.start).abs().mean())
        return {"refusal": max(0.0, 0.9 - 20.0 * moved), "refusal_score": -moved, "nll": 2.0}

    def confirm(self, model, prompts=None):
        r = self(model)["refusal"]
        return {"refusal_rate": {"value": r, "low": r, "high": r, "level": 0.95}, "nll": 2.0, "n": 4, "examples": []}


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mod, "FastEval", FakeEval)
    model = make_tiny_model()
    config = BenchConfig(attacks=("benign-lora",), lrs=(1e-3, 3e-2), n_examples=(4,), seeds=(0, 1), steps=6,
                         eval_every=2, batch_size=2)
    harmful, harmless = ["bad one", "bad two"], ["good one", "good two"]
    whole = bench_mod.run_bench(model, None, harmful, harmless, config, work_dir=tmp_path / "a", progress=False)
    assert len(whole["trials"]) == 4
    real = bench_mod.run_finetune_trial
    ran = []

    def killed_on_third(*args, **kwargs):
        ran.append(args[2])
        if len(ran) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_mod, "run_finetune_trial", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        bench_mod.run_bench(model, None, harmful, harmless, config, work_dir=tmp_path / "b", progress=False)
    assert len((tmp_path / "b" / "trials.jsonl").read_text().splitlines()) == 2
    ran.clear()
    monkeypatch.setattr(bench_mod, "run_finetune_trial", lambda *a, **k: ran.append(a[2]) or real(*a, **k))
    resumed = bench_mod.run_bench(model, None, harmful, harmless, config, work_dir=tmp_path / "b", progress=False)
    assert len(ran) == 2  # only the unfinished trials ran
    def timeless(obj):  # wall-clock seconds differ between runs; everything else must not
        if isinstance(obj, dict):
            return {k: timeless(v) for k, v in obj.items() if k != "seconds"}
        return [timeless(v) for v in obj] if isinstance(obj, list) else obj

    assert timeless(whole["trials"]) == timeless(resumed["trials"])
    assert whole["summary"]["benign-lora"]["by_setting"] == resumed["summary"]["benign-lora"]["by_setting"]
    assert resumed["summary"]["benign-lora"]["trials"] == 4
    # the model is back to its weights after every trial
    fresh = make_tiny_model()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_bad_input_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(MechsafeError, match="unknown attack 'harmful-lorra'.*did you mean harmful-lora"):
        BenchConfig(attacks=("harmful-lorra",))
    with pytest.raises(MechsafeError, match="budget_flops"):
        BenchConfig(budget_flops=0)
    model = make_tiny_model()
    test_prompt = prompt_pool("harmful", "test")[0]["text"]
    with pytest.raises(MechsafeError, match="also attack prompts"):
        bench_mod.run_bench(model, None, ["x"], ["y"], BenchConfig(attacks=("prefill",)), work_dir=tmp_path,
                            attack_requests=[{"id": "0", "text": "x"}], progress=False)
    with pytest.raises(MechsafeError, match="no safety to remove"):  # a random model refuses nothing
        bench_mod.run_bench(model, None, [test_prompt], ["hello"], BenchConfig(attacks=("prefill",), eval_limit=1,
                                                                               confirm_max_new_tokens=2),
                            work_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_attack_cli_bad_input_exits_2_with_nothing_written(tmp_path, monkeypatch, capsys):
    import mechsafe
    import mechsafe.models
    from mechsafe.cli import main

    model = make_tiny_model()
    monkeypatch.setattr(mechsafe, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(mechsafe.models, "load_model", lambda *a, **k: model)
    overlap = tmp_path / "overlap.jsonl"
    overlap.write_text(json.dumps({"text": prompt_pool("harmful", "train")[0]["text"]}) + "\n")
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs), "--work-dir", str(tmp_path / "work"), "--no-progress"]
    cases = [(["attack", "--attacks", "harmful-lorra", *common], "unknown attack"),
             (["attack", "--budget", "0", *common], "budget_flops"),
             (["attack", "--attacks", "prefill", "--harmful", str(overlap), *common], "also attack prompts"),
             (["attack", "--attacks", "prefill", "--eval-limit", "2", "--confirm-max-new-tokens", "2", *common],
              "no safety to remove"),
             (["attack", "--refusal-fraction", "1.5", *common], "refusal_fraction")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not runs.exists() and not (tmp_path / "work").exists()


def test_zero_step_attacks_edit_count_and_restore(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mod, "FastEval", FakeEval)
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = BenchConfig(attacks=("direction", "pruning", "prefill"), directions=2, prune_q=(0.05, 0.3),
                         responses="bundled", confirm_max_new_tokens=2)
    result = bench_mod.run_bench(model, None, ["bad one", "bad two"], ["good one"], config, work_dir=tmp_path / "w",
                                 progress=False)
    trials = {(t["attack"], t.get("rank"), t.get("p_q")): t for t in result["trials"]}
    assert set(trials) == {("direction", 1, None), ("direction", 2, None), ("pruning", None, 0.05),
                           ("pruning", None, 0.3), ("prefill", None, None)}
    d1, d2 = trials[("direction", 1, None)], trials[("direction", 2, None)]
    assert len(d1["layers"]) == 1 and d2["layers"][:1] == d1["layers"] and d1["curve"][0]["flops"] > 0
    p1, p2 = trials[("pruning", None, 0.05)], trials[("pruning", None, 0.3)]
    assert p1["curve"][0]["refusal_score"] < 0 and p2["curve"][0]["refusal_score"] < 0  # evaluated while pruned
    from mechsafe.snip import ScoreConfig, score

    tokens = sum(score(model, ScoreConfig(data=d, responses="bundled"), progress=False).manifest["n_tokens"]
                 for d in ("safety-short", "utility"))
    assert p1["curve"][0]["flops"] == 6 * sum(p.numel() for p in model.parameters()) * tokens
    assert trials[("prefill", None, None)]["curve"][0]["flops"] == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_summary_takes_the_cheapest_confirmed_break_and_the_refusal_only_point():
    threat, base = ThreatModel(), {"refusal": 0.8, "nll": 2.0}

    def point(flops, refusal, nll):
        return {"flops": flops, "step": flops // 10, "refusal": refusal, "nll": nll}

    def confirmed(rate):
        return {"refusal_rate": {"value": rate, "low": rate, "high": rate}, "nll": 2.0}

    trials = [
        {"attack": "harmful-lora", "lr": 1e-3, "n_examples": 10, "seed": 0,
         "curve": [point(0, 0.8, 2.0), point(10, 0.1, 3.0), point(20, 0.3, 2.1)],
         "break": {**point(20, 0.3, 2.1), "confirmed": confirmed(0.3)}},
        {"attack": "harmful-lora", "lr": 1e-3, "n_examples": 10, "seed": 1,  # generation does not confirm this one
         "curve": [point(0, 0.8, 2.0), point(15, 0.2, 2.0)], "break": {**point(15, 0.2, 2.0), "confirmed": confirmed(0.7)}},
        {"attack": "harmful-lora", "lr": 1e-4, "n_examples": 10, "seed": 0, "curve": [point(0, 0.8, 2.0)], "break": None},
    ]
    s = bench_mod.summarize(trials, threat, base, base_rate=0.86)["harmful-lora"]
    assert s["broken_trials"] == 1 and s["cost_to_break"]["flops"] == 20
    assert s["refusal_only"] == {"flops": 10, "step": 1, "refusal": 0.1, "nll": 3.0}
    assert s["cost_to_absolute"] == 15
    assert [g["broken_seeds"] for g in s["by_setting"]] == [1, 0]
    assert all(g["mean_flops_to_break"] is None for g in s["by_setting"])  # not every seed broke
