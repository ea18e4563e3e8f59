"""Generation, refusal score and directional ablation on the embedded SmolLM2-135M-Instruct."""

import numpy as np
import pytest
import torch

import mechsafe as ms
from mechsafe import evaluation as ev
from mechsafe import interventions as iv
from mechsafe.chat import encode_prompts
from mechsafe.directions import candidate_directions
from mechsafe.hooks import hook_names

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest on a shared CPU for a 135M model
    yield ms.load_model("smollm2-135m-instruct", processing="none")
    torch.set_num_threads(n)


def test_batched_greedy_generation_equals_unbatched(model):
    prompts = ms.data.load("harmful").split("test").texts[:2] + ms.data.load("harmless").split("test").texts[:2]
    batched = ev.generate(model, prompts, max_new_tokens=16, batch_size=4, progress=False)
    single = [ev.generate(model, [p], max_new_tokens=16, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(len(t) > 10 for t in batched)


def test_refusal_score_is_higher_for_harmful_prompts(model):
    harmful = ms.data.load("harmful").split("val").texts[:12]
    harmless = ms.data.load("harmless").split("val").texts[:12]
    s_harm = ev.refusal_score(model, harmful)
    s_safe = ev.refusal_score(model, harmless)
    assert np.all(np.isfinite(s_harm)) and np.all(np.isfinite(s_safe))
    assert s_harm.mean() > s_safe.mean()


def test_directional_ablation_is_orthogonal_and_matches_orthogonalized_weights(model):
    harmful = ms.data.load("harmful").split("train").texts[:8]
    harmless = ms.data.load("harmless").split("train").texts[:8]
    r = candidate_directions(model, harmful, harmless, n_positions=1, layers=[12])[0, 0]
    r_hat = r / r.norm()
    tokens = torch.tensor([encode_prompts(model.tokenizer, harmful[:1])[0].ids])
    names = [n for kind in ("resid_pre", "resid_mid", "resid_post") for n in hook_names(model, kind, "all")]
    with torch.inference_mode():
        _, clean = model.run_with_cache(tokens, names_filter=names)
        assert float((clean[names[12]] @ r_hat).abs().max()) > 1.0  # the direction is there to remove
        with iv.ablate_direction(model, r):
            hooked_logits, cache = model.run_with_cache(tokens, names_filter=names)
        for n in names:
            x = cache[n]
            assert float((x @ r_hat).abs().max()) < 1e-5 * max(1.0, float(x.norm(dim=-1).max())), n
        with iv.orthogonalize_weights(model, r):
            weight_logits = model(tokens)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    torch.testing.assert_close(weight_logits, hooked_logits, atol=2e-3, rtol=0)
