"""Weight selectors: names, axes and input hooks that agree with what the model computes."""

import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.weights import WEIGHT_KINDS, check_kinds, select, weight, writing_weights

from conftest import make_tiny_model

TOKENS = torch.tensor([[1, 20, 31, 44, 52, 63, 70, 2], [1, 33, 34, 35, 36, 37, 38, 39]])
OUTPUT_HOOK = {"attn.W_Q": "attn.hook_q", "attn.W_K": "attn.hook_k", "attn.W_V": "attn.hook_v",
               "attn.W_O": "hook_attn_out", "mlp.W_in": "mlp.hook_pre_linear", "mlp.W_gate": "mlp.hook_pre",
               "mlp.W_out": "hook_mlp_out"}
BIAS = {"attn.W_Q": "b_Q", "attn.W_K": "_b_K", "attn.W_V": "_b_V", "attn.W_O": "b_O", "mlp.W_in": "b_in",
        "mlp.W_out": "b_out"}


def test_select_orders_handles_by_layer_then_kind_and_names_the_grouped_weights():
    model = make_tiny_model()
    handles = select(model, ["mlp.W_out", "attn.W_K"], layers="1-2")
    assert [h.name for h in handles] == ["blocks.1.mlp.W_out", "blocks.1.attn._W_K", "blocks.2.mlp.W_out",
                                         "blocks.2.attn._W_K"]
    params = dict(model.named_parameters())
    assert all(h.parameter is params[h.name] for h in handles)
    assert [h.unit for h in handles] == ["neuron", "head"] * 2
    assert handles[0].n_units == model.cfg.d_mlp and handles[1].n_units == 2  # two key/value heads (grouped)
    assert len(select(model)) == len(WEIGHT_KINDS) * model.cfg.n_layers


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_input_hook_times_the_matrix_gives_the_weights_output(kind):
    """input activation (hook value x norm weight) @ as_matrix(W) + bias equals the weight's output hook."""
    model = make_tiny_model()
    h = weight(model, kind, 1)
    out_hook = f"blocks.1.{OUTPUT_HOOK[kind]}"
    _, cache = model.run_with_cache(TOKENS, names_filter=[h.input_hook, out_hook])
    x = cache[h.input_hook]
    if h.input_norm_weight is not None:
        x = x * model.get_parameter(h.input_norm_weight)
    x = x.flatten(-2) if kind == "attn.W_O" else x
    y = x @ h.as_matrix(h.parameter)
    module = model.get_submodule(h.name.rsplit(".", 1)[0])
    if kind in BIAS:
        bias = getattr(module, BIAS[kind])
        y = y + (bias.flatten() if kind.startswith("attn.W_") and kind != "attn.W_O" else bias)
    torch.testing.assert_close(y, cache[out_hook].flatten(2) if y.dim() == 3 and cache[out_hook].dim() == 4
                               else cache[out_hook], rtol=1e-4, atol=1e-5)
    assert torch.equal(h.from_matrix(h.as_matrix(h.parameter)), h.parameter)
    assert h.in_features == x.shape[-1]


def test_typos_and_missing_weights_name_the_valid_choices():
    model = make_tiny_model()
    with pytest.raises(MechsafeError, match="did you mean mlp.W_in"):
        check_kinds("mlp.W_inn")
    with pytest.raises(MechsafeError, match="repeat"):
        check_kinds(["mlp.W_in", "mlp.W_in"])
    with pytest.raises(MechsafeError, match="out of range"):
        select(model, "mlp.W_in", layers="3")
    model.cfg.gated_mlp = False  # pretend: the weight is still there, so delete it to see the error
    del model.blocks[0].mlp.W_gate
    with pytest.raises(MechsafeError, match="has no W_gate"):
        weight(model, "mlp.W_gate", 0)


def test_writing_weights_are_the_residual_writers():
    model = make_tiny_model()
    names = [n for n, _ in writing_weights(model)]
    assert names[0] == "embed.W_E"
    assert names[1:5] == ["blocks.0.attn.W_O", "blocks.0.attn.b_O", "blocks.0.mlp.W_out", "blocks.0.mlp.b_out"]
    params = dict(model.named_parameters())
    assert all(p.shape[-1] == model.cfg.d_model and p is params[n] for n, p in writing_weights(model))
    assert len(names) == 1 + 4 * model.cfg.n_layers
