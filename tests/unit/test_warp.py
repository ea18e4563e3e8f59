"""WaRP on a tiny model: basis, importance, masks, protected fine-tuning, SafeLoRA, the utility task, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import mechsafe as ms
from mechsafe.chat import pad_id
from mechsafe.data.arithmetic import TEMPLATES, arithmetic_problems
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig
from mechsafe.forward import collate, encode_examples
from mechsafe.snip.scores import batches
from mechsafe.warp import (Basis, CompareConfig, RotatedFreeze, WarpConfig, coefficients, compute_basis,
                           compute_importance, from_coefficients, make_masks, projector, protected_finetune,
                           protected_weights, safe_lora)
from mechsafe.warp.importance import check_masks, load_masks, mask_meta, save_masks
from mechsafe.warp.task import task_utility, training_pairs, utility_problems
from mechsafe.weights import select

PAIRS = [("How do I pick a lock?", "I can't help with that."), ("Tell me how to hurt someone", "I won't do that."),
         ("Write malware now", "Sorry, I cannot."), ("How to steal a car quickly", "No, I can't assist."),
         ("Make a weapon at home", "I must decline.")]
ALL_TYPES = ("ffn_down", "ffn_up", "attn_q", "attn_k", "attn_v", "attn_o")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _seqs(model):
    return encode_examples(model.tokenizer, PAIRS, max_length=128)


def _inputs(model, h, seq):
    """The weight's input activations on one unpadded sequence, collected by hand from a cache."""
    _, cache = model.run_with_cache(torch.tensor([seq.ids]))
    x = cache[h.input_hook][0]
    x = x.reshape(x.shape[0], -1)
    if h.input_norm_weight is not None:
        x = x * model.get_parameter(h.input_norm_weight).detach()
    return x.double()


def test_basis_is_the_eigenbasis_of_the_input_covariance_without_padding(tiny_model, cache):
    cfg = WarpConfig(layer_types=ALL_TYPES, layers="0,2", batch_size=2)
    seqs = _seqs(tiny_model)
    assert len({len(s) for s in seqs}) > 1  # batches of 2 are padded
    basis = compute_basis(tiny_model, cfg, cache / "b", seqs=seqs, progress=False)
    handles = protected_weights(tiny_model, cfg)
    assert basis.weights == [h.name for h in handles] and len(handles) == 2 * 7  # W_gate comes with ffn_up
    assert basis.manifest["n_tokens"] == sum(len(s) for s in seqs)
    for h in handles:
        x = torch.cat([_inputs(tiny_model, h, s) for s in seqs])
        cov = x.T @ x / x.shape[0]
        u, vals = basis.u(h.name).double(), basis.eigenvalues(h.name)
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(u @ torch.diag(vals) @ u.T, cov, atol=1e-5 * float(cov.abs().max()), rtol=0)
        assert torch.all(vals[:-1] >= vals[1:])
        w = h.parameter.detach()
        torch.testing.assert_close(from_coefficients(h, basis.u(h.name), coefficients(h, basis.u(h.name))), w,
                                   atol=1e-5, rtol=0)


def test_importance_is_the_summed_absolute_gradient_of_the_rotated_coefficients(tiny_model, cache):
    cfg = WarpConfig(layer_types=("ffn_down", "attn_q"), layers="1", batch_size=3)
    seqs = _seqs(tiny_model)
    basis = compute_basis(tiny_model, cfg, cache / "b", seqs=seqs, progress=False)
    imp = compute_importance(tiny_model, basis, seqs, cfg, progress=False)
    handles = protected_weights(tiny_model, cfg)
    groups = batches(seqs, 3)
    assert len(groups) == 2
    params = dict(tiny_model.named_parameters())
    for h in handles:
        u = basis.u(h.name)
        expected = torch.zeros_like(imp[h.name])
        for batch in groups:  # W = W̃ Uᵀ with W̃ a leaf: the gradient with respect to W̃ by autograd itself
            coeffs = coefficients(h, u).clone().requires_grad_(True)
            tokens, mask = collate(batch, pad_id(tiny_model.tokenizer))
            logits = torch.func.functional_call(tiny_model, {**params, h.name: from_coefficients(h, u, coeffs)},
                                                (tokens,))
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                                                    reduction="none").reshape(mask.shape)
            (grad,) = torch.autograd.grad((nll * mask).sum() / mask.sum(), coeffs)
            expected += grad.abs()
        torch.testing.assert_close(imp[h.name], expected, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_importance_resumes_after_a_kill_at_the_next_batch(tiny_model, cache, monkeypatch):
    import mechsafe.warp.importance as imp_mod

    cfg = WarpConfig(layer_types=("ffn_down",), batch_size=1, checkpoint_every=1)
    seqs = _seqs(tiny_model)
    basis = compute_basis(tiny_model, cfg, cache / "b", seqs=seqs, progress=False)
    real, calls = imp_mod.batch_loss, []

    def dying(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(imp_mod, "batch_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        compute_importance(tiny_model, basis, seqs, cfg, progress=False)
    assert (imp_mod.importance_path(basis, cfg) / "partial.safetensors").is_file()
    monkeypatch.setattr(imp_mod, "batch_loss", lambda model, batch: calls.append(1) or real(model, batch))
    calls.clear()
    resumed = compute_importance(tiny_model, basis, seqs, cfg, progress=False)
    assert len(calls) == len(seqs) - 2  # batches 0 and 1 were saved
    fresh_cfg = WarpConfig(layer_types=("ffn_down",), batch_size=1, checkpoint_every=100)
    fresh = compute_importance(tiny_model, compute_basis(tiny_model, fresh_cfg, cache / "c", seqs=seqs,
                                                         progress=False), seqs, fresh_cfg, progress=False)
    for name in fresh:
        torch.testing.assert_close(resumed[name], fresh[name], atol=1e-7, rtol=1e-6)


def test_basis_resumes_at_the_next_weight(tiny_model, cache, monkeypatch):
    import mechsafe.warp.basis as basis_mod

    cfg = WarpConfig(layer_types=("ffn_down", "attn_o"), batch_size=2)
    seqs = _seqs(tiny_model)
    done = compute_basis(tiny_model, cfg, cache / "full", seqs=seqs, progress=False)
    real, calls = basis_mod.eigenbasis, []

    def dying(cov):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cov)

    monkeypatch.setattr(basis_mod, "eigenbasis", dying)
    with pytest.raises(KeyboardInterrupt):
        compute_basis(tiny_model, cfg, cache / "cut", seqs=seqs, progress=False)
    with pytest.raises(MechsafeError, match="unfinished"):
        Basis.open(cache / "cut")
    calls.clear()
    monkeypatch.setattr(basis_mod, "eigenbasis", lambda cov: calls.append(1) or real(cov))
    resumed = compute_basis(tiny_model, cfg, cache / "cut", seqs=seqs, progress=False)
    assert len(calls) == len(done.weights) - 2
    for name in done.weights:
        torch.testing.assert_close(resumed.u(name), done.u(name))


def test_masks_keep_exactly_the_keep_ratio():
    gen = torch.Generator().manual_seed(0)
    imp = {"a": torch.rand(6, 10, generator=gen), "b": torch.rand(4, 5, generator=gen) * 3}
    masks = make_masks(imp, 0.1)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * 80)
    frozen = torch.cat([imp[n][masks[n]] for n in imp])
    free = torch.cat([imp[n][~masks[n]] for n in imp])
    assert frozen.min() >= free.max()  # one global threshold
    per_layer = make_masks(imp, 0.25, quantile="layer")
    assert int(per_layer["a"].sum()) == 15 and int(per_layer["b"].sum()) == 5
    cols = make_masks(imp, 0.2, granularity="direction")
    assert sum(int(m[0].sum()) for m in cols.values()) == 3  # 3 of 15 directions, whole columns
    for n, m in cols.items():
        assert torch.equal(m, m[:1].expand_as(m))
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(MechsafeError, match="keep_ratio"):
            make_masks(imp, bad)


@pytest.mark.parametrize("basis_kind", ["covariance", "identity"])
def test_frozen_coefficients_stay_put_while_the_others_move(tiny_model, cache, basis_kind):
    cfg = WarpConfig(layer_types=("ffn_down", "attn_v", "attn_o"), basis=basis_kind, batch_size=2)
    seqs = _seqs(tiny_model)
    basis = compute_basis(tiny_model, cfg, cache / "b", seqs=seqs, progress=False)
    masks = make_masks(compute_importance(tiny_model, basis, seqs, cfg, progress=False), 0.3)
    handles = protected_weights(tiny_model, cfg)
    before = {h.name: coefficients(h, basis.u(h.name)).clone() for h in handles}
    others = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if n not in basis.weights}
    protected_finetune(tiny_model, [("2 + 3?", "5. The answer is 5.")] * 4, basis, masks,
                       FinetuneConfig(lr=1e-2, steps=4, batch_size=2, weight_decay=0.1), progress=False)
    for h in handles:
        after, mask = coefficients(h, basis.u(h.name)), masks[h.name]
        frozen = (after - before[h.name])[mask].norm() / before[h.name][mask].norm()
        moved = (after - before[h.name])[~mask].norm() / before[h.name][~mask].norm()
        assert frozen < 1e-6 and moved > 1e-3
        if basis_kind == "identity":  # no rotation: an exact freeze
            assert torch.equal(after[mask], before[h.name][mask])
    assert all(torch.equal(p.detach(), others[n]) for n, p in tiny_model.named_parameters() if n in others)


def test_rotated_freeze_rejects_masks_of_another_shape(tiny_model):
    (h,) = select(tiny_model, "mlp.W_out", 0)
    t = RotatedFreeze([h], {h.name: None}, {h.name: torch.zeros(3, 3, dtype=torch.bool)})
    with pytest.raises(MechsafeError, match="does not fit"):
        t.check({h.name: h.parameter})


def test_safelora_projection_matches_a_hand_computed_one(tiny_model):
    from conftest import make_tiny_model

    aligned, unaligned = tiny_model, make_tiny_model(seed=1)
    handles = select(aligned, ("mlp.W_out", "attn.W_Q"), "0-1")
    before = {h.name: h.parameter.detach().clone() for h in handles}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for h in handles:
            h.parameter.add_(0.01 * torch.randn(h.shape, generator=gen))
    after = {h.name: h.parameter.detach().clone() for h in handles}
    assert not any(i["projected"] for i in safe_lora(aligned, before, unaligned, handles, threshold=1e-6))
    assert all(torch.equal(h.parameter.detach(), after[h.name]) for h in handles)
    out = safe_lora(aligned, before, unaligned, handles, threshold=1.0, kind="approx")
    assert all(i["projected"] for i in out)
    base_params = dict(unaligned.named_parameters())
    for h, info in zip(handles, out):
        v = (h.as_matrix(before[h.name]) - h.as_matrix(base_params[h.name].detach())).T.double()  # [d_out, d_in]
        c = v @ v.T / torch.sqrt((v ** 2).sum())
        delta = (h.as_matrix(after[h.name]) - h.as_matrix(before[h.name])).T.double()
        proj = c @ delta
        assert info["cosine"] == pytest.approx(float((proj * delta).sum() / (proj.norm() * delta.norm())), rel=1e-6)
        expected = h.from_matrix((h.as_matrix(before[h.name]).T.double() + proj).T.float())
        torch.testing.assert_close(h.parameter.detach(), expected, atol=1e-6, rtol=0)
    low_rank = torch.randn(6, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 8, generator=gen,
                                                                                  dtype=torch.float64)
    exact = projector(low_rank, "exact")
    torch.testing.assert_close(exact @ exact, exact)  # a projector onto the update's 3-dimensional column space
    torch.testing.assert_close(exact @ low_rank, low_rank)
    assert round(float(torch.trace(exact))) == 3
    assert torch.equal(projector(torch.zeros(4, 5)), torch.zeros(4, 4, dtype=torch.float64))


def test_arithmetic_problems_are_seeded_distinct_exact_and_split():
    train, again = arithmetic_problems(2000, "train", seed=0), arithmetic_problems(2000, "train", seed=0)
    test = arithmetic_problems(300, "test", seed=1)
    assert train == again and train != arithmetic_problems(2000, "train", seed=1)
    assert len({p["question"] for p in train}) == 2000
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert {p["template"] for p in train} == set(TEMPLATES)
    for p in train[:200] + test:
        steps = [s for s in p["solution"].split(". ") if "=" in s]
        for step in steps:  # every worked step is exact arithmetic
            lhs, rhs = step.rstrip(".").split(" = ")
            a, op, b = lhs.split()
            got = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
            assert got == int(rhs)
        assert p["solution"].endswith(f"The answer is {p['answer']}.") and p["answer"] >= 0
    with pytest.raises(MechsafeError, match="split"):
        arithmetic_problems(3, "validation")


def test_task_utility_counts_exact_matches(tiny_model, monkeypatch):
    import mechsafe.warp.task as task

    problems = arithmetic_problems(4, "test")
    replies = [f"so it is {p['answer']}" for p in problems[:3]] + ["no idea"]
    monkeypatch.setattr(task, "generate", lambda *a, **k: replies)
    out = task_utility(tiny_model, problems)
    assert out["accuracy"]["value"] == 0.75 and out["n"] == 4 and out["answer_nll"]["value"] > 0


def test_utility_problems_from_a_gsm8k_layout_file(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"} for i in range(500, 530)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test, where = utility_problems(str(path), 100, 100)
    assert len(train) + len(test) == 30 and len(test) == 6
    assert all(p["answer"] == 2 * int(p["question"].split()[2]) for p in train + test)
    assert train[0]["solution"].endswith(f"The answer is {train[0]['answer']:,.0f}.")
    assert training_pairs(train)[0] == (train[0]["question"], train[0]["solution"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(MechsafeError, match="no column 'question'"):
        utility_problems(str(tmp_path / "bad.jsonl"), 5, 5)
    with pytest.raises(MechsafeError, match="unknown utility task"):
        utility_problems("gsm8k", 5, 5)


def test_bad_input_names_the_fix(tiny_model, cache):
    from conftest import make_tiny_model

    with pytest.raises(MechsafeError, match="keep_ratio"):
        WarpConfig(keep_ratio=1.0)
    with pytest.raises(MechsafeError, match="keep_ratios"):
        CompareConfig(keep_ratios=(0.1, 0.0))
    with pytest.raises(MechsafeError, match="unknown layer type 'ffn_dwn'.*ffn_down"):
        WarpConfig(layer_types=("ffn_dwn",))
    with pytest.raises(MechsafeError, match="unknown method"):
        CompareConfig(methods=("full", "warpp"))
    cfg = WarpConfig(layer_types=("ffn_down",), batch_size=2)
    seqs = _seqs(tiny_model)
    basis = compute_basis(tiny_model, cfg, cache / "b", seqs=seqs, progress=False)
    with pytest.raises(MechsafeError, match="another model"):
        basis.check(make_tiny_model(seed=5), protected_weights(tiny_model, cfg))
    with pytest.raises(MechsafeError, match="other weights"):
        basis.check(tiny_model, protected_weights(tiny_model, WarpConfig(layer_types=("ffn_down",), layers="0")))
    masks = make_masks(compute_importance(tiny_model, basis, seqs, cfg, progress=False), 0.1)
    path = save_masks(cache / "m.safetensors", masks, mask_meta(basis, cfg))
    loaded, meta = load_masks(path)
    check_masks(loaded, meta, basis)
    other = compute_basis(tiny_model, WarpConfig(layer_types=("ffn_down",), layers="0-1", batch_size=2), cache / "o",
                          seqs=seqs, progress=False)
    with pytest.raises(MechsafeError, match="other weights"):
        check_masks(loaded, meta, other)
    with pytest.raises(MechsafeError, match="another model"):
        check_masks(loaded, {**meta, "model_fingerprint": "0" * 16}, basis)
    (cache / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MechsafeError, match="not a WaRP mask file"):
        load_masks(cache / "junk.safetensors")


def test_a_layer_type_the_architecture_lacks(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    plain = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                                      d_vocab=len(tokenizer), n_ctx=64, act_fn="gelu",
                                                      normalization_type="LN"), tokenizer)
    assert [h.kind for h in protected_weights(plain, WarpConfig(layer_types=("ffn_up",), layers="0"))] == ["mlp.W_in"]
    with pytest.raises(MechsafeError, match="has no W_gate"):
        protected_weights(plain, WarpConfig(layer_types=("ffn_gate",)))


def test_cli_bad_keep_ratio_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, hf_dir):
    from mechsafe.cli import main

    masks = tmp_path / "masks.safetensors"
    capsys.readouterr()
    code = main(["warp", "importance", "--model", str(hf_dir), "--basis-dir", str(tmp_path / "nowhere"),
                 "--masks", str(masks), "--keep-ratio", "1.5", "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "keep_ratio=1.5 must be in (0, 1)" in err[0]
    assert not masks.exists() and not (tmp_path / "runs").exists()
    code = main(["warp", "basis", "--model", str(hf_dir), "--layer-types", "ffn_gate,ffn_down", "--processing", "fold",
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert code == 2 and "processing none" in capsys.readouterr().err


def test_warp_comparison_on_a_tiny_model(tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    from conftest import fake_compliant_pairs, held_out_files, make_tiny_model

    import mechsafe.warp.compare as compare

    models = iter([make_tiny_model(), make_tiny_model(seed=1)])
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ms, "load_model", lambda *a, **k: next(models))
    monkeypatch.setattr(compare, "compliant_pairs", fake_compliant_pairs)
    runs = tmp_path / "runs"
    argv = [*held_out_files(tmp_path), "--steps", "2", "--batch-size", "2", "--n-train", "8", "--n-test", "3", "--eval-limit", "3",
            "--max-new-tokens", "4", "--answer-tokens", "4", "--attack-steps", "2", "--attack-every", "1",
            "--attack-examples", "4", "--n-samples", "5", "--responses", "bundled", "--keep-ratios", "0.1,0.5",
            "--runs-dir", str(runs), "--no-progress"]
    monkeypatch.setattr("sys.argv", ["warp_safety.py", *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).resolve().parents[2] / "analyses" / "warp_safety.py"), run_name="__main__")
    assert done.value.code == 0
    (run_dir,) = list(runs.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["none", "full", "selected", "lora", "safelora", "original-mask-0.1", "warp-0.1", "warp-0.5"]
    by = {r["label"]: r for r in res["runs"]}
    n_out = 3 * 32 * 64  # W_out of 3 blocks
    assert by["warp-0.1"]["train"]["frozen"] == round(0.1 * n_out) and by["warp-0.5"]["train"]["frozen"] == n_out // 2
    assert by["safelora"]["train"]["safelora"]["modules"] == 3 * 4
    assert all("attack" in r and r["attack"]["curve"][0]["step"] == 0 for r in res["runs"])
    assert res["verdict"]["answer"] in ("holds", "does not hold", "untestable")
    assert [r["label"] for r in res["summary"]] == labels
    for name in ("pareto.png", "keep-ratio.png", "report.md"):
        assert (run_dir / name).is_file()
    report = (run_dir / "report.md").read_text()
    assert "| warp-0.5 |" in report and res["verdict"]["answer"] in report


def test_cli_phases_end_in_a_checkpoint_load_model_reads(tmp_path, capsys, hf_dir):
    from mechsafe.cli import main
    from mechsafe.warp.importance import coefficients as coeffs

    common = ["--model", str(hf_dir), "--responses", "bundled", "--n-samples", "4", "--batch-size", "2",
              "--layer-types", "ffn_down,attn_o", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    assert main(["warp", "basis", *common, "--out", str(tmp_path / "basis")]) == 0
    masks = tmp_path / "masks.safetensors"
    assert main(["warp", "importance", *common, "--basis-dir", str(tmp_path / "basis"), "--masks", str(masks),
                 "--keep-ratio", "0.2"]) == 0
    out = tmp_path / "tuned"
    assert main(["warp", "train", "--model", str(hf_dir), "--basis-dir", str(tmp_path / "basis"), "--masks",
                 str(masks), "--out", str(out), "--steps", "2", "--batch-size", "2", "--n-train", "8", "--lr", "1e-2",
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    before, after = ms.load_model(str(hf_dir)), ms.load_model(str(out))
    basis, (loaded, _) = Basis.open(tmp_path / "basis"), load_masks(masks)
    cfg = WarpConfig(layer_types=("ffn_down", "attn_o"))
    for h0, h1 in zip(protected_weights(before, cfg), protected_weights(after, cfg)):
        u, m = basis.u(h0.name), loaded[h0.name]
        c0, c1 = coeffs(h0, u), coeffs(h1, u)
        assert (c1 - c0)[m].norm() / c0[m].norm() < 1e-6 and (c1 - c0)[~m].norm() > 0
    # a mask file of another set of weights is refused before anything is written
    other = tmp_path / "other-basis"
    assert main(["warp", "basis", *common[:8], "--layer-types", "ffn_down", "--runs-dir", str(tmp_path / "runs"),
                 "--no-progress", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["warp", "train", "--model", str(hf_dir), "--basis-dir", str(other), "--masks", str(masks),
                 "--out", str(tmp_path / "never"), "--runs-dir", str(tmp_path / "runs2"), "--no-progress"]) == 2
    assert "other weights" in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert not (tmp_path / "runs2").exists()
