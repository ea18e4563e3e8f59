"""Embedded MFS neurons on tiny models: widening is exact, the checkpoint equals base + added neurons, training moves
only the added neurons, removal, importance, the CLI and bad input."""

import json

import pytest
import torch

import mechsafe as ms
from mechsafe import align as al
from mechsafe.cli import main
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig
from mechsafe.interventions import hooked
from mechsafe.mfs import embed as E

SMALL = dict(harmful_limit=4, harmless_limit=4, answer_tokens=4, answer_prompts=False, refusal_prompts=False)


def _recipe(path) -> al.AlignConfig:
    return al.AlignConfig(model=str(path), finetune=FinetuneConfig(max_length=400), **SMALL)


def _tokens(model, n=3, pos=11, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _no_hooks(model) -> bool:
    return all(not point.fwd_hooks for point in model.hook_dict.values())


def test_split_counts_and_config_validation():
    assert E.split_counts(10, 3, "all") == [4, 3, 3]
    assert E.split_counts(5, 4, "1,3") == [0, 3, 0, 2]
    with pytest.raises(MechsafeError, match="unknown write directions"):
        E.EmbedConfig(directions="many")
    with pytest.raises(MechsafeError, match="n_features"):
        E.EmbedConfig(n_features=0)
    with pytest.raises(MechsafeError, match="feature_dropout"):
        E.EmbedConfig(feature_dropout=1.0)


def test_widened_model_is_base_plus_added_neurons_and_exactly_base_with_them_zeroed(hf_dir):
    base = ms.load_model(str(hf_dir))
    wide = E.widen(base, [3, 2], torch.Generator().manual_seed(1))
    spec = E.embedded_spec(wide)
    assert wide.cfg.d_mlp == base.cfg.d_mlp + 3 and spec.neurons() == [(0, 64), (0, 65), (0, 66), (1, 64), (1, 65)]
    tokens = _tokens(base)
    with torch.no_grad():
        assert torch.equal(wide(tokens), base(tokens))  # write rows start at zero
        for layer in (0, 1):  # give the added neurons something to write
            wide.blocks[layer].mlp.W_out[64:64 + spec.counts[layer]] = torch.randn(spec.counts[layer], 32) * 0.5
        changed = wide(tokens)
        with hooked(base, E.added_contribution_hooks(base, wide)):
            added = base(tokens)
        assert _no_hooks(base)
        plain = base(tokens)
        assert (changed - plain).abs().max() > 1e-2
        torch.testing.assert_close(changed, added, atol=1e-5, rtol=1e-5)
        before = {n: p.clone() for n, p in wide.named_parameters()}
        edit = E.remove_neurons(wide, range(spec.n_features))
        assert torch.equal(wide(tokens), plain)
        edit.undo()
        assert all(torch.equal(p, before[n]) for n, p in wide.named_parameters())


def test_saved_embedded_checkpoint_is_read_by_load_model(hf_dir, tmp_path):
    base = ms.load_model(str(hf_dir))
    wide = E.widen(base, [2, 2], torch.Generator().manual_seed(2))
    with torch.no_grad():
        wide.blocks[1].mlp.W_out[64:66] = 0.3
    out = E.save_embedded(wide, tmp_path / "emb", note="x")
    assert json.loads((out / "hf" / "config.json").read_text())["intermediate_size"] == 66
    back = ms.load_model(str(out))
    assert back.cfg.d_mlp == 66 and E.embedded_spec(back) == E.embedded_spec(wide)
    tokens = _tokens(base, seed=3)
    with torch.no_grad():
        assert torch.equal(back(tokens), wide(tokens))
    with pytest.raises(MechsafeError, match="no embedded MFS neurons"):
        E.embedded_spec(base)


def test_write_overlap_is_the_mean_squared_cosine(hf_dir):
    base = ms.load_model(str(hf_dir))
    wide = E.widen(base, [3, 0], torch.Generator().manual_seed(0))
    spec = E.embedded_spec(wide)
    with torch.no_grad():
        rows = wide.blocks[0].mlp.W_out
        rows[64:67] = torch.eye(32)[:3] * torch.tensor([[1.0], [2.0], [3.0]])
        assert float(E.write_overlap(wide, spec)) == pytest.approx(0.0, abs=1e-6)
        rows[64:67] = torch.tensor([1.0] + [0.0] * 31)
        assert float(E.write_overlap(wide, spec)) == pytest.approx(1.0, abs=1e-5)
        rows[64:67] = 0
        rows[64, 0], rows[65, 0], rows[65, 1], rows[66, 1] = 1, 1, 1, 1  # cosines 1/√2, 0, 1/√2
        assert float(E.write_overlap(wide, spec)) == pytest.approx((0.5 + 0 + 0.5) / 3, abs=1e-5)


def test_importance_is_mean_absolute_activation_times_write_norm(hf_dir):
    base = ms.load_model(str(hf_dir))
    wide = E.widen(base, [2, 1], torch.Generator().manual_seed(4))
    with torch.no_grad():
        wide.blocks[0].mlp.W_out[64] = 2.0
        wide.blocks[1].mlp.W_out[64] = 0.5
    prompts = ["how are you", "a b"]
    imp = E.neuron_importance(wide, prompts)
    assert imp.shape == (3,) and imp[1] == 0  # neuron (0, 65) writes nothing
    from mechsafe.chat import encode_prompts

    acts = []
    for enc in encode_prompts(wide.tokenizer, prompts):
        _, cache = wide.run_with_cache(torch.tensor([enc.ids]), names_filter="blocks.1.mlp.hook_post")
        acts.append(cache["blocks.1.mlp.hook_post"][0, :, 64].abs())
    expected = torch.cat(acts).mean() * wide.blocks[1].mlp.W_out[64].norm()
    assert float(imp[2]) == pytest.approx(float(expected), rel=1e-4)


def test_embed_trains_only_the_added_neurons_resumes_and_leaves_no_hook(hf_dir, tmp_path):
    base = ms.load_model(str(hf_dir))
    cfg = E.EmbedConfig(base=str(hf_dir), n_features=7, steps=3, lr=1e-2)
    wide, summary = E.embed(cfg, tmp_path / "work", model=ms.load_model(str(hf_dir)), recipe=_recipe(hf_dir),
                            progress=False)
    spec = E.embedded_spec(wide)
    assert spec.counts == [4, 3] and _no_hooks(wide)
    for layer in (0, 1):
        mlp, ref = wide.blocks[layer].mlp, base.blocks[layer].mlp
        for kind in ("W_in", "W_gate"):
            assert torch.equal(getattr(mlp, kind)[:, :64], getattr(ref, kind))
        assert torch.equal(mlp.W_out[:64], ref.W_out)
        norms = mlp.W_out[64:].norm(dim=1)
        assert (norms[:spec.counts[layer]] > 0).all() and (norms[spec.counts[layer]:] == 0).all()
    assert set(summary["terms"]) == {"nll", "retain_kl", "unlikelihood", "preference", "mfs_neurons"}
    assert len(summary["losses"]) == 3 and summary["resumed_from"] == 0
    again, second = E.embed(cfg, tmp_path / "work", model=ms.load_model(str(hf_dir)), recipe=_recipe(hf_dir),
                            progress=False)
    assert second["resumed_from"] == 3 and second["losses"] == summary["losses"]
    assert torch.equal(again.blocks[1].mlp.W_out, wide.blocks[1].mlp.W_out)


def test_building_costs_the_reference_passes_once_and_each_step(hf_dir):
    base = ms.load_model(str(hf_dir))
    small, wide = (E.build_flops(E.EmbedConfig(base=str(hf_dir), n_features=n, steps=9), base, _recipe(hf_dir))
                   for n in (2, 64))
    assert 0 < small["step"] < wide["step"]  # more neurons, more multiply-adds in every MLP
    assert small["setup"] > 0  # the retain objective's reference pass over every example, before the first step
    assert small["total"] == small["setup"] + 9 * small["step"]


def test_single_direction_control_writes_along_one_direction(hf_dir, tmp_path):
    cfg = E.EmbedConfig(base=str(hf_dir), n_features=4, steps=2, lr=1e-2, directions="single")
    wide, _ = E.embed(cfg, None, model=ms.load_model(str(hf_dir)), recipe=_recipe(hf_dir), progress=False)
    spec = E.embedded_spec(wide)
    r = torch.tensor(spec.direction)
    assert r.norm() == pytest.approx(1.0, abs=1e-5)
    rows = torch.cat([wide.blocks[layer].mlp.W_out[64:64 + spec.counts[layer]] for layer in spec.layers]).detach()
    assert (rows.norm(dim=1) > 0).all()
    residual = rows - (rows @ r).unsqueeze(1) * r
    assert residual.norm() < 1e-6 * rows.norm()


def test_removal_curve_restores_the_model_and_ranks_targets(hf_dir):
    base = ms.load_model(str(hf_dir))
    wide = E.widen(base, [2, 2], torch.Generator().manual_seed(5))
    with torch.no_grad():
        wide.blocks[0].mlp.W_out[64:66] = 0.1
        wide.blocks[1].mlp.W_out[64:66] = 0.2
    before = {n: p.clone() for n, p in wide.named_parameters()}
    points = E.removal_curve(wide, ["a", "b"], ["c"], [0, 0.5], "targeted", importance=torch.tensor([4., 3, 2, 1]),
                             max_new_tokens=2, progress=False)
    assert [p["removed"] for p in points] == [0, 2] and {"refusal", "over_refusal"} <= set(points[0])
    assert all(torch.equal(p, before[n]) for n, p in wide.named_parameters())
    with pytest.raises(MechsafeError, match="one importance per added neuron"):
        E.removal_curve(wide, ["a"], ["b"], [0.5], "targeted", importance=torch.ones(3), progress=False)
    with pytest.raises(MechsafeError, match="unknown removal mode"):
        E.removal_curve(wide, ["a"], ["b"], [0.5], "biggest", progress=False)


def test_cli_embed_and_eval_end_to_end_and_bad_input(hf_dir, tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "emb"
    assert main(["mfs", "embed", "--base", "no-such-model", "--out", str(out), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'no-such-model'") and len(err.splitlines()) == 1
    assert not runs.exists() and not out.exists()
    assert main(["mfs", "embed", "--base", str(hf_dir), "--out", str(out), "--n-features", "4", "--steps", "2",
                 "--runs-dir", str(runs), "--no-progress"]) == 0
    assert ms.load_model(str(out)).cfg.d_mlp == 66 and not (tmp_path / "emb.work").exists()
    assert main(["mfs", "embed-eval", "--model", str(out), "--fractions", "0,0.5", "--max-new-tokens", "2",
                 "--runs-dir", str(runs), "--no-progress"]) == 0
    result = json.loads(next(runs.glob("mfs-embed-eval-*/results.json")).read_text())
    assert [p["removed"] for p in result["removal"]] == [0, 2, 0, 2]
    assert {"all_removed", "direction_ablated"} <= set(result) and next(runs.glob("mfs-embed-eval-*/removal.png"))
    capsys.readouterr()
    assert main(["mfs", "embed-eval", "--model", str(hf_dir), "--runs-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no embedded MFS neurons" in err and len(err.splitlines()) == 1 and not (tmp_path / "r2").exists()
