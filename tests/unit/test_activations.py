import json

import pytest
import torch

from mechsafe.activations import ActivationConfig, ActivationStore, cache_activations
from mechsafe.chat import encode_prompts
from mechsafe.errors import MechsafeError

PROMPTS = ["how do I bake bread?", "hi", "write a long poem about the sea, the moon and the stars", "ok then"]


def _manual(model, prompt, layer):
    (enc,) = encode_prompts(model.tokenizer, [prompt])
    _, cache = model.run_with_cache(torch.tensor([enc.ids]))
    act = cache[f"blocks.{layer}.hook_resid_post"][0]
    s, e = enc.content
    return act[-1], act[s:e].mean(0), act


def test_pooled_values_match_an_unbatched_forward(tiny_model, tmp_path):
    store = cache_activations(tiny_model, PROMPTS, ActivationConfig(batch_size=3), root=tmp_path, progress=False)
    for i, p in enumerate(PROMPTS):
        last, mean, _ = _manual(tiny_model, p, 1)
        torch.testing.assert_close(store.pooled("blocks.1.hook_resid_post", "last")[i], last, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(store.pooled("blocks.1.hook_resid_post", "mean")[i], mean, atol=1e-5, rtol=1e-5)


def test_batched_equals_alone_with_padding(tiny_model, tmp_path):
    batched = cache_activations(tiny_model, PROMPTS, root=tmp_path / "a", batch_size=4, progress=False)
    for i, p in enumerate(PROMPTS):
        alone = cache_activations(tiny_model, [p], root=tmp_path / "b", batch_size=1, progress=False)
        for h in batched.hooks:
            torch.testing.assert_close(batched.pooled(h, "last")[i], alone.pooled(h, "last")[0], atol=1e-5, rtol=1e-5)


def test_token_pooling_drops_position_zero_and_repeated_prefix(tiny_model, tmp_path):
    store = cache_activations(tiny_model, PROMPTS, pooling=("tokens",), root=tmp_path, progress=False)
    prefix = store.manifest["shared_prefix_tokens"]
    assert prefix > 5  # the system prompt of the chat template is shared
    acts, prompt_idx, pos = next(store.iter_tokens("blocks.0.hook_resid_post"))
    assert (pos >= 1).all()
    assert ((prompt_idx != 0) & (pos < prefix)).sum() == 0  # only prompt 0 keeps the shared prefix
    encoded = encode_prompts(tiny_model.tokenizer, PROMPTS)
    expected = (len(encoded[0]) - 1) + sum(len(e) - prefix for e in encoded[1:])
    assert acts.shape == (expected, tiny_model.cfg.d_model) == (store.n_tokens(), 32)
    _, _, full = _manual(tiny_model, PROMPTS[2], 0)
    sel = prompt_idx == 2
    torch.testing.assert_close(acts[sel], full[pos[sel]], atol=1e-5, rtol=1e-5)


def test_reuse_shards_and_layer_selection(tiny_model, tmp_path):
    cfg = ActivationConfig(layers="0,2", hook="mlp_out", shard_size=3, batch_size=2)
    store = cache_activations(tiny_model, PROMPTS, cfg, root=tmp_path, progress=False)
    assert store.hooks == ["blocks.0.hook_mlp_out", "blocks.2.hook_mlp_out"]
    assert len(store.manifest["shards"]) == 2 and store.pooled("blocks.2.hook_mlp_out").shape == (4, 32)
    again = cache_activations(tiny_model, PROMPTS, cfg, root=tmp_path, progress=False)
    assert again.path == store.path
    assert json.loads((store.path / "manifest.json").read_text())["complete"] is True
    with pytest.raises(MechsafeError, match="not in this store"):
        store.pooled("blocks.1.hook_mlp_out")


def test_stops_after_the_last_needed_layer(tiny_model, tmp_path):
    seen = []
    tiny_model.blocks[2].hook_resid_pre.add_hook(lambda act, hook: seen.append(hook.name))
    try:
        cache_activations(tiny_model, PROMPTS, layers="0", root=tmp_path, progress=False)
    finally:
        tiny_model.reset_hooks()
    assert seen == []


def test_corrupt_store_is_detected_and_rebuilt(tiny_model, tmp_path):
    store = cache_activations(tiny_model, PROMPTS, root=tmp_path, progress=False)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(MechsafeError, match="corrupt"):
        ActivationStore(store.path)
    rebuilt = cache_activations(tiny_model, PROMPTS, root=tmp_path, progress=False)
    assert rebuilt.n_prompts == 4


def test_bad_config_and_empty_data(tiny_model, tmp_path):
    with pytest.raises(MechsafeError, match="pooling"):
        ActivationConfig(pooling=("max",))
    with pytest.raises(MechsafeError, match="empty"):
        cache_activations(tiny_model, [], root=tmp_path)
    with pytest.raises(MechsafeError, match="out of range"):
        cache_activations(tiny_model, PROMPTS, layers="5", root=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
