import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.sae import inspect_features, logit_effect
from mechsafe.sae.load import LoadedSAE
from sae_helpers import random_topk_sae  # noqa: F401

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["how do I pick a lock?", "write an insult about my neighbour", "tell me a joke about cats"]


def test_logit_effect_is_the_decoder_through_the_unembedding(tiny_model):
    sae = LoadedSAE(random_topk_sae(32, HOOK, d_sae=48, k=5), HOOK)
    eff = logit_effect(tiny_model, sae, [3, 7])
    expected = (sae.W_dec[[3, 7]] * tiny_model.ln_final.w) @ tiny_model.W_U
    torch.testing.assert_close(eff, expected.detach())
    assert logit_effect(tiny_model, sae).shape == (48, tiny_model.cfg.d_vocab)


def test_mlp_latents_go_through_w_out(tiny_model):
    from sae_helpers import random_topk_sae as make

    sae = LoadedSAE(make(64, "blocks.1.mlp.hook_post", d_sae=16, k=2), "blocks.1.mlp.hook_post")
    eff = logit_effect(tiny_model, sae, [0])
    expected = (sae.W_dec[[0]] @ tiny_model.blocks[1].mlp.W_out * tiny_model.ln_final.w) @ tiny_model.W_U
    torch.testing.assert_close(eff, expected.detach())


def test_top_examples_are_the_largest_activations(tiny_model, tmp_path):
    from mechsafe.chat import encode_prompts

    sae = LoadedSAE(random_topk_sae(32, HOOK, d_sae=48, k=5), HOOK)
    # per-token latents by hand (position 0 is not in the store, so it is left out here too)
    per_token = [sae.encode(tiny_model.run_with_cache(torch.tensor([e.ids]))[1][HOOK][0])[1:]
                 for e in encode_prompts(tiny_model.tokenizer, TEXTS)]
    fired = torch.cat(per_token).gt(0).sum(0)
    busiest, silent = int(fired.argmax()), int(fired.argmin())
    reports = inspect_features(tiny_model, sae, [busiest, silent], TEXTS, top_n=4, activation_root=tmp_path)
    assert [r.feature for r in reports] == [busiest, silent]
    top = reports[0]
    acts = [ex["activation"] for ex in top.top_examples]
    assert len(acts) == 4 and acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
    expected = torch.cat(per_token)[:, busiest].topk(4).values
    torch.testing.assert_close(torch.tensor(acts), expected, rtol=1e-4, atol=1e-5)
    best = top.top_examples[0]
    assert best["text"] == TEXTS[best["prompt"]] and best["token"] in best["context"]
    assert 0 < top.frequency <= 1 and len(top.logit_top) == 10 and len(top.logit_bottom) == 10
    assert top.logit_top[0][1] >= top.logit_top[-1][1] and top.logit_bottom[0][1] <= top.logit_bottom[-1][1]
    assert f"Feature {busiest}" in top.markdown()
    if int(fired[silent]) == 0:
        assert reports[1].top_examples == [] and reports[1].frequency == 0


def test_out_of_range_features_raise(tiny_model):
    sae = LoadedSAE(random_topk_sae(32, HOOK, d_sae=48, k=5), HOOK)
    with pytest.raises(MechsafeError, match="0-47"):
        inspect_features(tiny_model, sae, [48])
    with pytest.raises(MechsafeError, match="out of range"):
        logit_effect(tiny_model, sae, [])
