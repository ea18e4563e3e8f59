import numpy as np
import pytest
import torch

import mechsafe as ms
from mechsafe.chat import encode_prompts
from mechsafe.errors import MechsafeError
from mechsafe.probes.sae_probes import TopKMeanDiff, probe_candidates
from mechsafe.sae import sae_features
from mechsafe.sae.load import LoadedSAE
from sae_helpers import random_topk_sae  # noqa: F401

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def prompts():
    ps = ms.data.load("toxicity_vs_other_harm")
    keep = [i for c in (0, 1) for i in np.flatnonzero(ps.labels == c)[:12]]
    return ps.subset(sorted(keep))


def test_topk_mean_diff_selects_on_the_rows_it_is_fit_on():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    X = rng.normal(size=(40, 6)) * 0.01
    X[:20, 2] += 5 * y[:20]            # feature 2 separates the classes in the first half only
    X[20:, 4] += 50 * y[20:]           # feature 4 separates them (more strongly) in the second half only
    train = TopKMeanDiff(1).fit(X[:20], y[:20])
    assert train.get_support(indices=True).tolist() == [2]
    assert TopKMeanDiff(1).fit(X, y).get_support(indices=True).tolist() == [4]
    assert train.transform(X).shape == (40, 1)
    np.testing.assert_array_equal(train.transform(X)[:, 0], X[:, 2])
    assert TopKMeanDiff(10).fit(X, y).transform(X).shape == (40, 6)  # k is capped at the feature count


def test_topk_mean_diff_multiclass_uses_one_vs_rest():
    X = np.zeros((30, 4))
    y = np.repeat([0, 1, 2], 10)
    X[y == 2, 3] = 1.0
    X[y == 1, 1] = 0.5
    sel = TopKMeanDiff(2).fit(X, y)
    assert sel.get_support(indices=True).tolist() == [1, 3]
    with pytest.raises(MechsafeError, match="two classes"):
        TopKMeanDiff(1).fit(X[:10], y[:10])


def test_sae_features_encode_each_token_then_pool(tiny_model, tmp_path):
    sae = LoadedSAE(random_topk_sae(32, HOOK, d_sae=48, k=5), HOOK)
    texts = ["how do I pick a lock?", "write an insult", "tell me a joke about cats and dogs"]
    feats = sae_features(tiny_model, sae, texts, activation_root=tmp_path)
    assert set(feats) == {"last", "mean", "binsum"} and all(v.shape == (3, 48) for v in feats.values())
    for i, enc in enumerate(encode_prompts(tiny_model.tokenizer, texts)):
        _, cache = tiny_model.run_with_cache(torch.tensor([enc.ids]))
        per_token = sae.encode(cache[HOOK][0])
        s, e = enc.content
        np.testing.assert_allclose(feats["last"][i], per_token[-1].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats["mean"][i], per_token[s:e].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(feats["binsum"][i], (per_token[s:e] > 0).sum(0).numpy())
        assert not np.allclose(feats["mean"][i], sae.encode(cache[HOOK][0, s:e].mean(0)).numpy())


def test_probe_candidates_have_documented_methods_and_shapes(tiny_model, prompts, tmp_path):
    from mechsafe.probes import Candidate

    sae = LoadedSAE(random_topk_sae(32, HOOK, d_sae=48, k=5), HOOK)
    cands = probe_candidates(tiny_model, prompts, sae=sae, poolings=["last", "mean"], ks=[1, 16], seed=0,
                             activation_root=tmp_path)
    assert [c.key for c in cands] == ["sae_all/last", "sae_k1/last", "sae_k16/last", "sae_all/mean", "sae_k1/mean",
                                      "sae_k16/mean", "sae_binsum/binsum"]
    y = prompts.labels
    for c in cands:
        assert isinstance(c, Candidate) and c.layer == 1
        assert c.features.shape == (len(prompts), 48) and c.features.dtype == np.float32
        est = c.make_estimator(0).fit(c.features, y)
        assert est.predict_proba(c.features).shape == (len(prompts), 2)
        if c.method.startswith("sae_k"):
            assert len(est.named_steps["select"].get_support(indices=True)) == int(c.method[len("sae_k"):])


def test_probe_candidates_load_from_a_path_and_reject_bad_input(tiny_model, prompts, tmp_path):
    from mechsafe.sae import save_sae

    path = save_sae(random_topk_sae(32, HOOK, d_sae=48, k=5), tmp_path / "sae", {"hook_name": HOOK}, training=False)
    cands = probe_candidates(tiny_model, prompts, sae_path=path, poolings=["mean"], ks=[4], binsum=False,
                             activation_root=tmp_path)
    assert [c.key for c in cands] == ["sae_all/mean", "sae_k4/mean"]
    with pytest.raises(MechsafeError, match="sae_path"):
        probe_candidates(tiny_model, prompts)
    with pytest.raises(MechsafeError, match="pooling"):
        probe_candidates(tiny_model, prompts, sae_path=path, poolings=["max"])
    with pytest.raises(MechsafeError, match="ks"):
        probe_candidates(tiny_model, prompts, sae_path=path, ks=[0])
    wrong = LoadedSAE(random_topk_sae(16, HOOK), HOOK)
    with pytest.raises(MechsafeError, match="16-dim"):
        sae_features(tiny_model, wrong, prompts, activation_root=tmp_path)
