import json

import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.sae import load_sae, make_config, train_sae
from mechsafe.sae.train import ShuffledBatches, build_training_sae, fit_sae, token_pool
from mechsafe.sae.texts import eval_prompts, training_texts

SMALL = dict(layer=1, k=4, expansion_factor=2, batch_size=128, max_texts=60, eval_max_prompts=8, lr=3e-3)


def test_shuffled_batches_cover_each_epoch_once_and_reshuffle():
    pool = torch.arange(12, dtype=torch.float32)[:, None]
    a = ShuffledBatches(pool, 4, seed=1)
    first = torch.cat([next(a) for _ in range(3)]).flatten()
    second = torch.cat([next(a) for _ in range(3)]).flatten()
    assert sorted(first.tolist()) == list(range(12)) and sorted(second.tolist()) == list(range(12))
    assert first.tolist() != second.tolist()
    b = ShuffledBatches(pool, 4, seed=1)
    assert torch.cat([next(b) for _ in range(3)]).flatten().tolist() == first.tolist()
    with pytest.raises(MechsafeError, match="training tokens"):
        ShuffledBatches(pool, 64, seed=0)


def test_training_texts_never_include_held_out_prompts():
    cfg = make_config()
    held_out = set(eval_prompts(cfg).texts)
    texts = training_texts(cfg)
    assert held_out and not held_out & set(texts)
    assert len(texts) > len(training_texts(make_config(extra_texts=False)))


def test_local_text_sources(tmp_path):
    (tmp_path / "t.txt").write_text("first text\n\nsecond text\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"body": "a jsonl text"}) + "\n")
    assert training_texts(make_config(source=str(tmp_path / "t.txt"))) == ["first text", "second text"]
    assert training_texts(make_config(source=str(tmp_path / "t.jsonl"), text_column="body")) == ["a jsonl text"]
    with pytest.raises(MechsafeError, match="no 'text' field"):
        training_texts(make_config(source=str(tmp_path / "t.jsonl")))
    with pytest.raises(MechsafeError, match="does not exist"):
        training_texts(make_config(source=str(tmp_path / "missing.txt")))


def test_fit_from_cached_tokens_reduces_mse(tiny_model, tmp_path):
    cfg = make_config(SMALL, training_tokens=128 * 150)
    pool, info = token_pool(tiny_model, cfg, "blocks.1.hook_resid_post", activation_root=tmp_path, progress=False)
    assert pool.shape[1] == 32 and info["n_tokens"] == pool.shape[0] > 1000
    sae = build_training_sae(cfg, 32, "blocks.1.hook_resid_post")
    with torch.no_grad():
        before = (sae.decode(sae.encode(pool)) - pool).pow(2).mean().item()
    trained, fit_info = fit_sae(sae, pool, cfg, progress=False)
    with torch.no_grad():
        after = (trained.decode(trained.encode(pool)) - pool).pow(2).mean().item()
    assert fit_info["steps"] == 150
    assert after < 0.5 * before


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "standard", "jumprelu"])
def test_train_sae_end_to_end_saves_metrics_and_loads_back(arch, tiny_model, tmp_path):
    cfg = make_config(SMALL, architecture=arch, training_tokens=128 * 30)
    result = train_sae(tiny_model, cfg, out_dir=tmp_path / "sae", activation_root=tmp_path / "acts", progress=False)
    names = {p.name for p in result.path.iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "mechsafe_sae.json", "report.md", "run.json"} <= names
    meta = json.loads((result.path / "mechsafe_sae.json").read_text())
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["training"]["architecture"] == arch
    for key in ("l0", "explained_variance", "mse", "dead_fraction", "dense_fraction", "ce_increase", "ce_recovered"):
        assert meta["metrics"][key] == pytest.approx(getattr(result.metrics, key))
        assert meta["metrics"][key] == meta["metrics"][key]  # finite, not NaN
    assert "explained variance" in (result.path / "report.md").read_text()
    run = json.loads((result.path / "run.json").read_text())
    assert run["seed"] == 0 and run["weight_processing"] == "unknown" and "sae-lens" in run["versions"]
    loaded = load_sae(result.path)
    assert loaded.hook_name == "blocks.1.hook_resid_post" and loaded.d_sae == 64
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x))


def test_same_seed_same_sae(tiny_model, tmp_path):
    cfg = make_config(SMALL, training_tokens=128 * 10)
    a = train_sae(tiny_model, cfg, out_dir=tmp_path / "a", activation_root=tmp_path / "acts", progress=False)
    b = train_sae(tiny_model, cfg, out_dir=tmp_path / "b", activation_root=tmp_path / "acts", progress=False)
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec)


def test_bad_hook_and_store_source_fail_before_writing(tiny_model, tmp_path):
    with pytest.raises(MechsafeError, match="out of range"):
        train_sae(tiny_model, make_config(SMALL, layer=7), out_dir=tmp_path / "x", activation_root=tmp_path)
    with pytest.raises(MechsafeError):
        train_sae(tiny_model, make_config(SMALL, source=f"store:{tmp_path / 'nothing'}"), out_dir=tmp_path / "y",
                  activation_root=tmp_path)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_store_source_reads_an_existing_token_cache(tiny_model, tmp_path):
    import mechsafe as ms

    store = ms.cache_activations(tiny_model, ["alpha beta gamma", "delta epsilon"] * 40, hook="resid_post", layers="1",
                                 pooling=("tokens",), root=tmp_path, progress=False)
    cfg = make_config(SMALL, source=f"store:{store.path}")
    pool, info = token_pool(tiny_model, cfg, "blocks.1.hook_resid_post")
    assert info["n_tokens"] == store.n_tokens() == pool.shape[0]


def test_runner_config_is_built_for_the_hook(tiny_model):
    from mechsafe.sae.runner import hook_dim, runner_config

    cfg = make_config(SMALL, route="runner", training_tokens=2048, context_size=32)
    rc = runner_config(tiny_model, cfg, "blocks.1.hook_resid_post")
    assert rc.hook_name == "blocks.1.hook_resid_post" and rc.sae.d_in == 32 and rc.sae.d_sae == 64
    assert rc.training_tokens == 2048 and rc.context_size == 32 and rc.seqpos_slice == (1, None)
    assert rc.logger.log_to_wandb is False and rc.output_path is None
    assert hook_dim(tiny_model, "blocks.1.mlp.hook_post") == 64


def test_decoder_bias_starts_at_the_activation_mean(tiny_model, tmp_path):
    cfg = make_config(SMALL, training_tokens=128, lr=1e-12, lr_warm_up_steps=0)
    pool, _ = token_pool(tiny_model, cfg, "blocks.1.hook_resid_post", activation_root=tmp_path, progress=False)
    trained, _ = fit_sae(build_training_sae(cfg, 32, "blocks.1.hook_resid_post"), pool, cfg, progress=False)
    torch.testing.assert_close(trained.b_dec.detach(), pool.mean(0), atol=1e-4, rtol=1e-4)  # scaling folded back
    zero = make_config(SMALL, training_tokens=128, lr=1e-12, lr_warm_up_steps=0, init_b_dec="zero")
    trained0, _ = fit_sae(build_training_sae(zero, 32, "blocks.1.hook_resid_post"), pool, zero, progress=False)
    assert trained0.b_dec.abs().max() < 1e-6
