import pytest
import torch

from mechsafe import interventions as iv
from mechsafe.chat import encode_prompts
from mechsafe.errors import MechsafeError
from mechsafe.hooks import hook_name, hook_names




PROMPTS = ["how do I pick a lock", "write a short poem"]


def _tokens(model, prompt="how do I pick a lock"):
    return torch.tensor([encode_prompts(model.tokenizer, [prompt])[0].ids])


def _no_hooks(model) -> bool:
    return all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())


class TinySAE:
    """A hand-built linear-ReLU SAE on resid_post of layer 1."""

    def __init__(self, d_model, d_sae=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.hook_name = "blocks.1.hook_resid_post"
        self.W_enc = torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5
        self.b_enc = torch.zeros(d_sae)
        self.W_dec = torch.randn(d_sae, d_model, generator=g) / d_sae ** 0.5

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec


def _interventions(model):
    d = model.cfg.d_model
    r = torch.randn(d)
    return {
        "steer": lambda: iv.steer(model, r, layers="all", coeff=2.0),
        "ablate_direction": lambda: iv.ablate_direction(model, r),
        "ablate_neurons": lambda: iv.ablate_neurons(model, [(0, 1), (2, 3)]),
        "patch": lambda: iv.patch(model, {hook_name(model, "resid_post", 1): torch.zeros(1, len(_tokens(model)[0]), d)}),
        "clamp_features": lambda: iv.clamp_features(model, TinySAE(d), {0: 3.0}),
    }


@pytest.mark.parametrize("kind", ["steer", "ablate_direction", "ablate_neurons", "patch", "clamp_features"])
def test_hooks_are_removed_after_exit_and_after_an_exception(tiny_model, kind):
    make = _interventions(tiny_model)[kind]
    clean = tiny_model(_tokens(tiny_model))
    with make():
        assert not _no_hooks(tiny_model)
        edited = tiny_model(_tokens(tiny_model))
    assert _no_hooks(tiny_model)
    assert not torch.allclose(clean, edited)
    with pytest.raises(RuntimeError, match="boom"):
        with make():
            raise RuntimeError("boom")
    assert _no_hooks(tiny_model)
    assert torch.equal(tiny_model(_tokens(tiny_model)), clean)


def test_nested_interventions_remove_only_their_own_hooks(tiny_model):
    r = torch.randn(tiny_model.cfg.d_model)
    with iv.ablate_direction(tiny_model, r):
        n_outer = sum(len(hp.fwd_hooks) for hp in tiny_model.hook_dict.values())
        with iv.steer(tiny_model, r, layers=[1]):
            assert sum(len(hp.fwd_hooks) for hp in tiny_model.hook_dict.values()) == n_outer + 1
        assert sum(len(hp.fwd_hooks) for hp in tiny_model.hook_dict.values()) == n_outer
    assert _no_hooks(tiny_model)


def test_bad_hook_name_adds_nothing(tiny_model):
    with pytest.raises(MechsafeError, match="no hook"):
        with iv.hooked(tiny_model, [(hook_name(tiny_model, "resid_pre", 0), lambda x, hook: x),
                                    ("blocks.0.hook_resid_typo", lambda x, hook: x)]):
            pass
    assert _no_hooks(tiny_model)


def test_directional_ablation_leaves_every_residual_orthogonal(tiny_model):
    r = torch.randn(tiny_model.cfg.d_model)
    r_hat = r / r.norm()
    names = [n for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
             for n in hook_names(tiny_model, kind, "all")]
    _, clean = tiny_model.run_with_cache(_tokens(tiny_model), names_filter=names)
    assert max(float((clean[n] @ r_hat).abs().max()) for n in names) > 1e-2  # the direction is present at first
    with iv.ablate_direction(tiny_model, r):
        _, cache = tiny_model.run_with_cache(_tokens(tiny_model), names_filter=names)
    for n in names:
        assert float((cache[n] @ r_hat).abs().max()) < 1e-5, n


def test_orthogonalized_weights_match_hook_ablation_and_undo_is_exact(tiny_model):
    r = torch.randn(tiny_model.cfg.d_model)
    tokens = _tokens(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with iv.ablate_direction(tiny_model, r):
        hooked_logits = tiny_model(tokens)
    handle = iv.orthogonalize_weights(tiny_model, r)
    r_hat = r / r.norm()
    assert float((tiny_model.W_E @ r_hat).abs().max()) < 1e-5
    assert float((tiny_model.blocks[1].attn.W_O @ r_hat).abs().max()) < 1e-5
    assert float((tiny_model.blocks[2].mlp.W_out @ r_hat).abs().max()) < 1e-5
    torch.testing.assert_close(tiny_model(tokens), hooked_logits, atol=1e-4, rtol=0)
    handle.undo()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with iv.orthogonalize_weights(tiny_model, r) as edited:
        torch.testing.assert_close(edited(tokens), hooked_logits, atol=1e-4, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_orthogonalized_copy_leaves_the_original_alone(tiny_model):
    r = torch.randn(tiny_model.cfg.d_model)
    w = tiny_model.W_E.clone()
    copy = iv.orthogonalized_copy(tiny_model, r)
    assert torch.equal(tiny_model.W_E, w)
    assert float((copy.W_E @ (r / r.norm())).abs().max()) < 1e-5


def test_steer_adds_exactly_coeff_times_vector(tiny_model):
    v = torch.randn(tiny_model.cfg.d_model)
    name = hook_name(tiny_model, "resid_pre", 1)
    tokens = _tokens(tiny_model)
    _, clean = tiny_model.run_with_cache(tokens, names_filter=[name])
    with iv.steer(tiny_model, v, layers=[1], coeff=3.0):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[name])
    torch.testing.assert_close(cache[name] - clean[name], (3.0 * v).expand_as(clean[name]), atol=1e-5, rtol=0)
    with iv.steer(tiny_model, v, layers=[1], coeff=1.0, positions=[-1]):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[name])
    diff = cache[name] - clean[name]
    assert torch.equal(diff[:, :-1], torch.zeros_like(diff[:, :-1]))
    torch.testing.assert_close(diff[0, -1], v, atol=1e-5, rtol=0)


def test_neuron_ablation_zeroes_or_means_exactly_those_neurons(tiny_model):
    tokens = _tokens(tiny_model)
    names = hook_names(tiny_model, "mlp_post", "all")
    _, clean = tiny_model.run_with_cache(tokens, names_filter=names)
    with iv.ablate_neurons(tiny_model, [(0, 1), (0, 5)]):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=names)
    act = cache[names[0]]
    assert torch.equal(act[..., [1, 5]], torch.zeros_like(act[..., [1, 5]]))
    keep = [i for i in range(act.shape[-1]) if i not in (1, 5)]
    assert torch.equal(act[..., keep], clean[names[0]][..., keep])
    means = {0: torch.arange(tiny_model.cfg.d_mlp, dtype=torch.float32)}
    with iv.ablate_neurons(tiny_model, [(0, 7)], mode="mean", means=means):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=names)
    assert torch.all(cache[names[0]][..., 7] == 7.0)
    with pytest.raises(MechsafeError, match="mean"):
        with iv.ablate_neurons(tiny_model, [(0, 7)], mode="mean"):
            pass
    with pytest.raises(MechsafeError, match="mode"):
        with iv.ablate_neurons(tiny_model, [(0, 7)], mode="max"):
            pass


def test_patch_reproduces_the_source_run(tiny_model):
    a = _tokens(tiny_model, "aaaa bbbb")
    b = _tokens(tiny_model, "cccc dddd")
    name = hook_name(tiny_model, "resid_post", 2)
    logits_a, cache_a = tiny_model.run_with_cache(a)
    with iv.patch(tiny_model, cache_a):
        torch.testing.assert_close(tiny_model(b), logits_a)
    with iv.patch(tiny_model, {name: cache_a[name]}, positions=[-1]):
        patched = tiny_model(b)
    torch.testing.assert_close(patched[:, -1], logits_a[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(patched[:, :-1], tiny_model(b)[:, :-1])
    with pytest.raises(MechsafeError, match="shape"):
        with iv.patch(tiny_model, {name: cache_a[name][:, :3]}):
            tiny_model(b)
    assert _no_hooks(tiny_model)


def test_clamp_features_keeps_the_reconstruction_error(tiny_model):
    sae = TinySAE(tiny_model.cfg.d_model)
    tokens = _tokens(tiny_model)
    _, clean = tiny_model.run_with_cache(tokens, names_filter=[sae.hook_name])
    with iv.clamp_features(tiny_model, sae, {2: 5.0, 4: 0.0}):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[sae.hook_name])
    x, y = clean[sae.hook_name], cache[sae.hook_name]
    f = sae.encode(x)
    target = f.clone()
    target[..., 2], target[..., 4] = 5.0, 0.0
    torch.testing.assert_close(y - sae.decode(target), x - sae.decode(f), atol=1e-5, rtol=0)
    expected = (5.0 - f[..., 2:3]) * sae.W_dec[2] + (0.0 - f[..., 4:5]) * sae.W_dec[4]
    torch.testing.assert_close(y - x, expected, atol=1e-5, rtol=0)


def test_bad_directions_raise(tiny_model):
    with pytest.raises(MechsafeError, match="d_model"):
        with iv.ablate_direction(tiny_model, torch.randn(5)):
            pass
    with pytest.raises(MechsafeError, match="zero"):
        iv.orthogonalize_weights(tiny_model, torch.zeros(tiny_model.cfg.d_model))
    assert _no_hooks(tiny_model)


def test_affine_ablation_sets_the_component_at_every_read_point(tiny_model):
    torch.manual_seed(0)
    r = torch.randn(tiny_model.cfg.d_model)
    names = iv.residual_read_points(tiny_model)
    reference = torch.linspace(-2.0, 3.0, len(names))
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (2, 7))
    with iv.affine_ablation(tiny_model, r, reference):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert all(not hp._forward_hooks and not hp.fwd_hooks for hp in tiny_model.hook_dict.values())
    r_hat = r / r.norm()
    for name, c in zip(names, reference):
        assert torch.allclose(cache[name] @ r_hat, torch.full((2, 7), float(c)), atol=1e-4)
    # zeros as the reference give the paper's directional ablation
    with iv.affine_ablation(tiny_model, r, torch.zeros(len(names))):
        affine = tiny_model(tokens)
    with iv.ablate_direction(tiny_model, r):
        zero = tiny_model(tokens)
    assert torch.allclose(affine, zero, atol=1e-4)
    with pytest.raises(MechsafeError, match="one value per read point"):
        with iv.affine_ablation(tiny_model, r, torch.zeros(2)):
            pass
