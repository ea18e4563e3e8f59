"""A short SAE training run on the embedded SmolLM2 model (about a minute on 2 idle cores)."""

import math

import pytest
import torch

import mechsafe as ms
from mechsafe.probes.sae_probes import probe_candidates
from mechsafe.sae import load_sae, make_config, train_sae

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    return ms.load_model("smollm2-135m-instruct", processing="none")


def test_short_topk_run_reconstructs_and_loads_back(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sae")
    cfg = make_config(layer=6, architecture="topk", k=32, expansion_factor=2, training_tokens=256 * 200,
                      batch_size=256, lr=1e-3, max_texts=150, eval_max_prompts=20)
    result = train_sae(model, cfg, out_dir=tmp / "sae", activation_root=tmp / "acts", progress=False)
    m = result.metrics
    for key in ("l0", "explained_variance", "mse", "ce_clean", "ce_sae", "ce_zero", "ce_increase", "ce_recovered"):
        assert math.isfinite(getattr(m, key)), key
    assert m.explained_variance > 0.3
    assert m.l0 == pytest.approx(32, abs=1e-6)  # TopK: exactly k latents per token
    assert m.ce_zero > m.ce_sae > m.ce_clean - 0.05
    assert 0 <= m.dead_fraction <= 1 and m.n_tokens > 200
    loaded = load_sae(result.path)
    assert loaded.hook_name == "blocks.6.hook_resid_post" and loaded.metrics["explained_variance"] == pytest.approx(
        m.explained_variance)
    x = torch.randn(4, model.cfg.d_model) * 10
    torch.testing.assert_close(loaded.encode(x), result.sae.encode(x))

    prompts = ms.data.load("toxicity_vs_other_harm").subset(list(range(24)))
    cands = probe_candidates(model, prompts, sae=loaded, poolings=["last"], ks=[1], activation_root=tmp / "acts")
    assert [c.key for c in cands] == ["sae_all/last", "sae_k1/last", "sae_binsum/binsum"]
    assert all(c.features.shape == (24, loaded.d_sae) for c in cands)
