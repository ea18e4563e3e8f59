import pytest
import torch

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.sae import evaluate_sae, splice_sae, zero_ablate
from mechsafe.sae.evaluate import reconstruction_stats
from sae_helpers import identity_sae, random_topk_sae, zero_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def held_out():
    return ms.data.load("harmful_vs_harmless").split("test").subset(list(range(6)))


def test_reconstruction_stats_on_hand_built_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) + 3.0
    feats = torch.zeros(50, 10)
    feats[:, 0] = 1.0          # fires everywhere: dense
    feats[:3, 1] = 2.0         # fires on 6% of tokens: neither dead nor dense
    perfect = reconstruction_stats(x, x, feats)
    assert perfect["explained_variance"] == pytest.approx(1.0)
    assert perfect["mse"] == pytest.approx(0.0) and perfect["cosine"] == pytest.approx(1.0)
    assert perfect["l0"] == pytest.approx(1 + 3 / 50)
    assert perfect["dead_fraction"] == pytest.approx(0.8) and perfect["dense_fraction"] == pytest.approx(0.1)
    mean_only = reconstruction_stats(x, x.mean(0).expand_as(x), feats)
    assert mean_only["explained_variance"] == pytest.approx(0.0, abs=1e-9)
    half = reconstruction_stats(x, x.mean(0) + 0.5 * (x - x.mean(0)), feats)
    assert half["explained_variance"] == pytest.approx(0.75)
    assert half["mse"] == pytest.approx(float((0.5 * (x - x.mean(0))).pow(2).mean()), rel=1e-6)


def test_identity_sae_costs_nothing(tiny_model, held_out):
    m = evaluate_sae(tiny_model, identity_sae(32, HOOK), held_out)
    assert m.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert m.ce_increase == pytest.approx(0.0, abs=1e-4)
    assert m.ce_recovered == pytest.approx(1.0, abs=1e-3)
    assert m.n_tokens == sum(e - s for s, e in (ms.chat.encode_prompts(tiny_model.tokenizer, [t])[0].content
                                                  for t in held_out.texts))
    assert m.ce_zero > m.ce_clean


def test_zero_sae_is_as_bad_as_zero_ablation(tiny_model, held_out):
    m = evaluate_sae(tiny_model, zero_sae(32, HOOK), held_out)
    assert m.ce_sae == pytest.approx(m.ce_zero, abs=1e-6)
    assert m.ce_recovered == pytest.approx(0.0, abs=1e-6)
    assert m.explained_variance < 0.05


def test_splice_changes_output_and_removes_its_hook(tiny_model):
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    clean = tiny_model(tokens)
    point = tiny_model.hook_dict[HOOK]
    with zero_ablate(tiny_model, HOOK):
        assert len(point.fwd_hooks) == 1
        ablated = tiny_model(tokens)
    assert len(point.fwd_hooks) == 0
    assert not torch.allclose(clean[0, 1:], ablated[0, 1:])
    torch.testing.assert_close(clean[0, 0], ablated[0, 0])  # position 0 is left alone
    torch.testing.assert_close(tiny_model(tokens), clean)


def test_splice_removes_its_hook_after_an_exception(tiny_model):
    point = tiny_model.hook_dict[HOOK]
    with pytest.raises(RuntimeError, match="boom"):
        with splice_sae(tiny_model, random_topk_sae(32, HOOK)):
            tiny_model(torch.tensor([[5, 6, 7]]))
            raise RuntimeError("boom")
    assert len(point.fwd_hooks) == 0


def test_splice_keeps_other_hooks(tiny_model):
    point = tiny_model.hook_dict[HOOK]
    point.add_hook(lambda act, hook: None)
    try:
        with splice_sae(tiny_model, identity_sae(32, HOOK)):
            assert len(point.fwd_hooks) == 2
        assert len(point.fwd_hooks) == 1
    finally:
        tiny_model.reset_hooks()


def test_bad_inputs(tiny_model, held_out):
    with pytest.raises(MechsafeError, match="no hook"):
        evaluate_sae(tiny_model, identity_sae(32, "blocks.9.hook_resid_post"), held_out)
    with pytest.raises(MechsafeError, match="no evaluation prompts"):
        evaluate_sae(tiny_model, identity_sae(32, HOOK), [])
    with pytest.raises(MechsafeError, match="not an SAE"):
        evaluate_sae(tiny_model, object(), held_out)
