"""The detector-mode safety bank on a tiny model: feature types, hooks, training, removal, saving, bad input."""

import numpy as np
import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.mfs import (BankConfig, PromptInputs, SafetyBank, SubBankSpec, TrainConfig, build_bank, load_bank,
                          prompt_inputs, removal_curve, run_with_bank, save_bank, scores_of, train_bank)


def _no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def test_every_feature_type_reads_the_model_and_leaves_no_hook(tiny_model):
    bank = build_bank(tiny_model, BankConfig(layers="1", n_features=4 * 64, d_key=8, k=4, n_groups=16, r=2))
    assert [s.spec.type for s in bank.subs] == ["semantic", "activation", "ngram", "attention"]
    assert [s.spec.layer for s in bank.subs] == [1, 1, None, 1]
    tokens = torch.randint(5, 90, (2, 9))
    xs = run_with_bank(tiny_model, bank, tokens, bank.inputs)
    d = tiny_model.cfg.d_model
    assert [tuple(x.shape) for x in xs] == [(2, 9, d), (2, 9, 2 * d), (2, 9, 3 * d), (2, 9, 16)]
    _, cache = tiny_model.run_with_cache(tokens)
    torch.testing.assert_close(xs[0], cache["blocks.1.hook_resid_post"])
    e = cache["hook_embed"]
    torch.testing.assert_close(xs[2][:, 4], torch.cat([e[:, 4], e[:, 3], e[:, 2]], -1))  # the last 3 tokens
    assert torch.equal(xs[2][:, 0, d:], torch.zeros(2, 2 * d))  # before the first token: nothing
    p = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(xs[3][:, :, 1::4], p.max(-1).values.transpose(1, 2))  # largest weight per head
    assert _no_hooks(tiny_model)
    with pytest.raises(RuntimeError):
        run_with_bank(tiny_model, bank, tokens, lambda acts: (_ for _ in ()).throw(RuntimeError("boom")))
    assert _no_hooks(tiny_model)


def test_bad_bank_settings_name_the_fix(tiny_model):
    with pytest.raises(MechsafeError, match="does not split into 4 sub-banks.*use 4096 or 4356"):
        build_bank(tiny_model, BankConfig(layers="1", n_features=4100))
    with pytest.raises(MechsafeError, match="unknown feature type 'semantc'.*semantic"):
        build_bank(tiny_model, BankConfig(types=("semantc",), layers="1", n_features=64))
    with pytest.raises(MechsafeError, match="layer"):
        build_bank(tiny_model, BankConfig(types=("semantic",), layers="7", n_features=64))
    with pytest.raises(MechsafeError, match="unknown aggregation rule"):
        BankConfig(rule="mean")


def _separable(n=80, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    rows, offsets = [], [0]
    for y in labels.tolist():
        length = int(torch.randint(2, 5, (1,), generator=gen))
        rows.append(torch.randn(length, dim, generator=gen) + (2.0 if y else -2.0) * torch.eye(dim)[0])
        offsets.append(offsets[-1] + length)
    x = torch.cat(rows)
    return PromptInputs([x, x.flip(-1)], torch.tensor(offsets)), labels



def _bank(tiny_model, n=256):
    bank = SafetyBank(tiny_model, [SubBankSpec("semantic", 0, n), SubBankSpec("semantic", 1, n)], d_key=4, k=8,
                      n_groups=24, r=3)
    for sub in bank.subs:  # the synthetic inputs have 6 dims
        sub.keys.query = torch.nn.Parameter(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)))
    return bank


def test_training_separates_the_classes_and_resumes(tiny_model, tmp_path):
    inputs, labels = _separable()
    test_inputs, test_labels = _separable(seed=1)
    bank = _bank(tiny_model)
    cfg = TrainConfig(steps=60, batch_size=16, checkpoint_every=20, sparsity=0.01, diversity=0.1)
    history = train_bank(bank, inputs, labels, cfg, work_dir=tmp_path / "w", progress=False)
    assert np.mean(history["safety"][-10:]) < 0.5 * history["safety"][0]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(test_labels.numpy(), scores_of(bank, test_inputs)) > 0.95
    resumed = _bank(tiny_model)
    again = train_bank(resumed, inputs, labels, TrainConfig(**{**cfg.__dict__, "steps": 80}), work_dir=tmp_path / "w",
                       progress=False)
    assert len(again["loss"]) == 80 and again["loss"][:60] == history["loss"]
    with pytest.raises(MechsafeError, match="both labels"):
        train_bank(_bank(tiny_model), inputs, torch.ones(len(labels)), cfg, progress=False)


def test_removing_every_feature_silences_the_bank(tiny_model):
    inputs, labels = _separable()
    bank = _bank(tiny_model)
    train_bank(bank, inputs, labels, TrainConfig(steps=30, batch_size=16, sparsity=0.01), progress=False)
    points = removal_curve(bank, inputs, labels.numpy(), [0.0, 0.999999], "random")
    assert points[0]["median"]["value"] > 0.9 and points[1]["median"]["value"] == 0.5
    assert bool(bank.alive.all())
    with pytest.raises(MechsafeError, match="importance"):
        removal_curve(bank, inputs, labels.numpy(), [0.5], "targeted")


def test_a_saved_bank_loads_only_for_its_model(tiny_model, tmp_path):
    from conftest import make_tiny_model

    cfg = BankConfig(layers="1", n_features=4 * 64, d_key=8, k=4, n_groups=16, r=2)
    bank = build_bank(tiny_model, cfg)
    with torch.no_grad():
        bank.subs[0].votes.normal_()
    save_bank(bank, tmp_path / "bank", tiny_model, cfg.__dict__)
    loaded, meta = load_bank(tmp_path / "bank", tiny_model)
    tokens = torch.randint(5, 90, (1, 7))
    score = lambda b: run_with_bank(tiny_model, b, tokens, lambda a: b.score(b.inputs(a)))  # noqa: E731
    torch.testing.assert_close(score(loaded), score(bank))
    with pytest.raises(MechsafeError, match="another model"):
        load_bank(tmp_path / "bank", make_tiny_model(seed=4))
    with pytest.raises(MechsafeError, match="no bank.json"):
        load_bank(tmp_path, tiny_model)


def test_prompt_inputs_pool_the_users_text_and_the_template_tail(tiny_model):
    bank = build_bank(tiny_model, BankConfig(types=("semantic",), layers="0", n_features=64, d_key=4, k=4,
                                             n_groups=8, r=2))
    from mechsafe.chat import encode_prompts

    prompts = ["short one", "a somewhat longer prompt here"]
    got = prompt_inputs(tiny_model, bank, prompts)
    enc = encode_prompts(tiny_model.tokenizer, prompts)
    assert got.offsets.tolist()[1:] == np.cumsum([len(e) - e.content[0] for e in enc]).tolist()
    _, cache = tiny_model.run_with_cache(torch.tensor([enc[1].ids]))
    torch.testing.assert_close(got.xs[0][got.offsets[1]:], cache["blocks.0.hook_resid_post"][0, enc[1].content[0]:],
                               atol=1e-5, rtol=1e-4)


def test_guarded_generation_applies_the_policy_to_flagged_prompts_only(tiny_model):
    from mechsafe.evaluation.generation import generate
    from mechsafe.mfs.detector import OPENING, guarded_generate

    bank = build_bank(tiny_model, BankConfig(types=("semantic",), layers="1", n_features=64, d_key=4, k=4,
                                             n_groups=8, r=2))
    prompts = ["tell me something", "another request"]
    with torch.no_grad():
        bank.bias.fill_(5.0)
    flagged = guarded_generate(tiny_model, bank, prompts, max_new_tokens=3)
    assert all(r["flagged"] and r["response"].startswith(OPENING) and r["score"] == 5.0 for r in flagged)
    with torch.no_grad():
        bank.bias.fill_(-5.0)
    plain = guarded_generate(tiny_model, bank, prompts, max_new_tokens=3)
    assert [r["response"] for r in plain] == generate(tiny_model, prompts, 3, progress=False)
    assert not any(r["flagged"] for r in plain) and _no_hooks(tiny_model)
    with pytest.raises(MechsafeError, match="refusal direction"):
        guarded_generate(tiny_model, bank, prompts, policy="steer")


def test_cli_trains_saves_and_evaluates_a_bank(hf_dir, tmp_path, capsys):
    import json

    from mechsafe.cli import main

    runs = tmp_path / "runs"
    small = ["--layers", "1", "--n-features", "256", "--d-key", "4", "--k", "4", "--n-groups", "16", "--r", "2"]
    capsys.readouterr()
    assert main(["mfs", "train", "--model", str(hf_dir), "--out", str(tmp_path / "bank"), "--layers", "1",
                 "--n-features", "4100",
                 "--runs-dir", str(runs), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "perfect square" in err[0] and not runs.exists() and not (tmp_path / "bank").exists()
    assert main(["mfs", "train", "--model", str(hf_dir), "--out", str(tmp_path / "bank"), *small, "--steps", "5",
                 "--runs-dir", str(runs), "--no-progress"]) == 0
    assert (tmp_path / "bank" / "bank.json").is_file() and not (tmp_path / "bank.work").exists()
    assert main(["mfs", "eval", "--model", str(hf_dir), "--bank", str(tmp_path / "bank"), "--fractions", "0,0.5",
                 "--runs-dir", str(runs), "--no-progress"]) == 0
    (run,) = [p for p in runs.iterdir() if p.name.startswith("mfs-eval")]
    res = json.loads((run / "results.json").read_text())
    assert set(res["auroc"]) == {"median", "trimmed", "majority", "sum"} and res["dense_probe"]["hook"].endswith(
        "blocks.1.hook_resid_post")
    assert [(p["mode"], p["fraction"]) for p in res["removal"]] == [("random", 0.0), ("random", 0.5),
                                                                    ("targeted", 0.0), ("targeted", 0.5)]
    assert (run / "removal.png").is_file()
