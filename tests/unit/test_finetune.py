"""The trainer on the tiny model: LoRA (identity at init, merge, attention), objectives, resume, save/load."""

import math

import pytest
import torch
from transformer_lens import HookedTransformer

import mechsafe as ms
from mechsafe import chat
from mechsafe.errors import MechsafeError
from mechsafe.finetune import (FinetuneConfig, Preference, ResponseNLL, RetainKL, Unlikelihood, adapted_weight,
                               attach_lora, example_order, finetune, has_lora, merge_lora)
from mechsafe.finetune.objectives import unlikelihood
from mechsafe.finetune.preference import Pair, dpo_loss, reference_pairs
from mechsafe.finetune.retain import coarse_kl, reference_topk, retain_kl_sum
from mechsafe.forward import (collate, encode_examples, final_resid, masked_nll, response_nll, sequence_nll,
                              shared_prompt_resid, token_nll, unembed)
from mechsafe.models import model_info

from conftest import make_tiny_model

ALL = ("mlp.W_in", "mlp.W_gate", "mlp.W_out", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O")
EXAMPLES = [("hello there", "hi!"), ("what is 2+2?", "4"), ("say cat twice", "cat cat"), ("bye now", "goodbye"),
            ("name a colour", "blue"), ("count to three", "1 2 3")]
TOKENS = torch.tensor([[1, 20, 31, 44, 52, 63, 70, 2], [1, 33, 34, 35, 36, 37, 38, 39]])
RECORDED = {'plain': [4.874185735529119, 4.516191655939275, 4.07946252822876, 4.058016159955193, 3.7365935189383372,
                      3.7033988551089636, 3.1354168162626377, 3.547393321990967],
            'terms': {'losses': [4.874185735529119, 4.6070005243474785, 3.9292235374450684, 4.2496176326976105,
                                 4.012430735996792, 3.3936775609066614, 3.3719004462747013, 3.1539502143859863],
                      'preference': [0.6931472420692444, 0.7436652183532715, 0.4832250773906708, 0.5333880186080933, None,
                                     0.35963507493336994, 0.43746495246887207, 0.27273717522621155],
                      'retain_kl': [0.0, 0.11444726255204943, 0.10699008347152116, 0.0865517324871487, 0.11014601257112291,
                                    0.1451132885821454, 0.12181760205162896, 0.17161703729010247],
                      'unlikelihood': [1.1049735348933609e-07, 3.145935625070706e-05, 4.253588485880755e-05,
                                       3.3809438674268014e-15, 2.3249711375683546e-05, 2.2876662342241616e-08,
                                       2.115757859167365e-14, 3.5552147892303765e-05]}}
"""Per-step losses of the LoRA trainer before it became the trainer of every method (same seeds, same tiny model):
``plain`` the response NLL alone, ``terms`` the four terms of :func:`terms` with weight 1."""


def terms(retain=(), negatives=None, rejected=None, weight=1.0, top_k=64, beta=0.1):
    """The objectives of EXAMPLES: the response NLL, plus the retain, unlikelihood and preference terms of the
    examples with these indices."""
    objectives = [ResponseNLL(EXAMPLES)]
    if retain:
        objectives.append(RetainKL([EXAMPLES[i] for i in retain], weight, top_k))
    if negatives:
        objectives.append(Unlikelihood([EXAMPLES[i] for i in negatives], list(negatives.values()), weight))
    if rejected:
        objectives.append(Preference([EXAMPLES[i] for i in rejected], list(rejected.values()), weight, beta))
    return objectives


def _randomize_b(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_lora_at_init_changes_nothing_and_only_lora_trains(tiny_model):
    with torch.no_grad():
        before = tiny_model(TOKENS)
    tuner = attach_lora(tiny_model, FinetuneConfig(targets=ALL))
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(float(p.abs().max()) == 0 for n, p in tiny_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(tiny_model(TOKENS), before)
    merge_lora(tuner)


def test_response_loss_is_the_masked_nll_of_response_tokens(tiny_model):
    tok = tiny_model.tokenizer
    seqs = encode_examples(tok, EXAMPLES[:3])
    for seq, (prompt, response) in zip(seqs, EXAMPLES[:3]):
        prompt_ids = tok(chat.format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        resp_ids = tok(response + chat.end_of_turn(tok), add_special_tokens=False)["input_ids"]
        assert seq.ids == prompt_ids + resp_ids and seq.prompt_len == len(prompt_ids)
    tokens, mask = collate(seqs, chat.pad_id(tok))
    # labels with the -100 convention: prompt and padding ignored
    labels = torch.full_like(tokens, -100)
    for i, s in enumerate(seqs):
        labels[i, s.prompt_len:len(s)] = torch.tensor(s.ids[s.prompt_len:])
    with torch.no_grad():
        logits = tiny_model(tokens)
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        got = masked_nll(tiny_model, tokens, mask).sum()
    assert mask.sum() == sum(len(s) - s.prompt_len for s in seqs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    # the padding id never matters: padding with another id gives the same loss
    with torch.no_grad():
        other = masked_nll(tiny_model, *collate(seqs, pad_id=7)).sum()
    torch.testing.assert_close(other, got)
    # per-example mean NLL agrees with the same masked sum
    per = response_nll(tiny_model, EXAMPLES[:3])
    lens = torch.tensor([len(s) - s.prompt_len for s in seqs], dtype=torch.float)
    torch.testing.assert_close((per * lens).sum(), expected, rtol=1e-5, atol=1e-4)


def test_response_loss_follows_the_models_own_logits_with_a_soft_cap(tiny_model):
    """The loss unembeds only scored positions; it must still apply every step of the model's own head."""
    tiny_model.cfg.output_logits_soft_cap = 0.5
    tokens, mask = collate(encode_examples(tiny_model.tokenizer, EXAMPLES[:3]), chat.pad_id(tiny_model.tokenizer))
    with torch.no_grad():
        logits = tiny_model(tokens)[:, :-1]
        full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        torch.testing.assert_close(masked_nll(tiny_model, tokens, mask), (full * mask).sum(1), rtol=1e-5, atol=1e-4)


def test_prompt_tokens_are_not_scored(tiny_model):
    """Changing the prompt changes the conditioning only: with a model that ignores context the loss is unchanged."""
    seqs = encode_examples(tiny_model.tokenizer, [("aaaa", "xyz"), ("bbbbbbbb", "xyz")])
    tokens, mask = collate(seqs, 0)
    assert mask[0].sum() == mask[1].sum() == len(seqs[0]) - seqs[0].prompt_len
    assert mask[0, :seqs[0].prompt_len - 1].sum() == 0  # nothing before the first response token is scored


def test_training_lowers_the_response_loss(tiny_model):
    before = response_nll(tiny_model, EXAMPLES).mean()
    result = finetune(tiny_model, EXAMPLES, FinetuneConfig(steps=12, batch_size=3, lr=1e-2), progress=False)
    after = response_nll(tiny_model, EXAMPLES).mean()
    assert after < before - 0.3
    assert result.merged and not has_lora(tiny_model) and len(result.losses) == 12
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("all_terms", [False, True])
def test_resumed_run_equals_uninterrupted_run(tmp_path, all_terms):
    cfg = FinetuneConfig(steps=6, batch_size=4, lr=5e-3, checkpoint_every=2, targets=ALL)
    # some steps hold no retained example; example 2's rejected response is also its negative
    objectives = terms([0], {1: "no", 2: "dog"}, {2: "dog", 4: "red"}) if all_terms else terms()
    straight = make_tiny_model()
    r1 = finetune(straight, objectives, cfg, progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(step, model):
        if step == 3:
            raise Crash

    interrupted = make_tiny_model()
    with pytest.raises(Crash):
        finetune(interrupted, objectives, cfg, run_dir=tmp_path, callback=crash_at_3, progress=False)
    assert not has_lora(interrupted)  # a failed run leaves the model as it came
    r2 = finetune(interrupted, objectives, cfg, run_dir=tmp_path, progress=False)
    assert r2.resumed_from == 2 and r2.losses == r1.losses and r2.terms == r1.terms
    assert set(r1.terms) == ({"nll", "retain_kl", "unlikelihood", "preference"} if all_terms else {"nll"})
    assert (None in r1.terms.get("retain_kl", [])) == (None in r1.terms.get("unlikelihood", [])) == all_terms
    for (name, a), b in zip(straight.state_dict().items(), interrupted.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "run.json").is_file() and (tmp_path / "losses.json").is_file()
    # another config or other objectives cannot resume from these checkpoints
    with pytest.raises(MechsafeError, match="another config"):
        finetune(make_tiny_model(), objectives, FinetuneConfig(steps=6, batch_size=4, lr=1e-3), run_dir=tmp_path,
                 progress=False)
    with pytest.raises(MechsafeError, match="other objectives"):
        finetune(make_tiny_model(), terms([1]), cfg, run_dir=tmp_path, progress=False)


def test_shared_prompt_pass_equals_one_pass_per_row_in_values_and_gradients(tiny_model):
    """Rows sharing a prompt (of different lengths, one with an unscored prefix) continue from its cached keys
    and values: residuals at every real position, losses and LoRA gradients equal one full pass per row."""
    tok = tiny_model.tokenizer
    seqs = encode_examples(tok, [("hello there", "hi!"), ("what is 2+2?", "4"), ("hello there", "go away, please"),
                                 ("what is 2+2?", "five or so", False), ("say cat", "cat", True, "Sure:")])
    assert seqs[0].ids[:seqs[0].prompt_len] == seqs[2].ids[:seqs[2].prompt_len]
    attach_lora(tiny_model, FinetuneConfig(targets=ALL))
    _randomize_b(tiny_model)
    pad = chat.pad_id(tok)
    grads = []
    for shared in (True, False):
        tiny_model.zero_grad(set_to_none=True)
        if shared:
            tokens, mask, resid = shared_prompt_resid(tiny_model, seqs, pad)
        else:
            tokens, mask = collate(seqs, pad)
            resid = final_resid(tiny_model, tokens)
        masked_nll(tiny_model, tokens, mask, resid=resid).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.requires_grad})
        if shared:
            shared_resid = resid.detach()
        else:
            assert torch.equal(tokens, collate(seqs, pad)[0])
            for row, seq in enumerate(seqs):
                torch.testing.assert_close(shared_resid[row, :len(seq) - 1], resid[row, :len(seq) - 1].detach(),
                                           rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)


def test_reference_passes_with_shared_prompts_equal_one_pass_per_row():
    """The retain term's top-k pass scoring each example's rejected response from the same prompt pass, and
    sequence_nll batching rows by prompt, give the per-row passes' figures."""
    model = make_tiny_model()
    tok = model.tokenizer
    seqs = encode_examples(tok, EXAMPLES)
    alts = encode_examples(tok, [(p, "no way") for p, _ in EXAMPLES[:4]])
    alternatives = [alts[0], None, alts[2], alts[3], None, None]
    plain = reference_topk(model, seqs, 5, batch_size=4)
    shared = reference_topk(model, seqs, 5, batch_size=4, alternatives=alternatives)
    alt_nll, _ = sequence_nll(model, alts)
    for j, (a, b) in enumerate(zip(plain, shared)):
        torch.testing.assert_close(b.logp, a.logp, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.idx, b.idx) and abs(a.response_nll - b.response_nll) < 1e-4
        assert a.alternative_nll is None
        if alternatives[j] is None:
            assert b.alternative_nll is None
        else:
            assert abs(b.alternative_nll - float(alt_nll[alts.index(alternatives[j])])) < 1e-4
    rows = seqs + alts
    per_row, count = sequence_nll(model, rows, batch_size=3)
    by_prompt, count2 = sequence_nll(model, rows, batch_size=3, share_prompts=True)
    assert torch.equal(count, count2)
    torch.testing.assert_close(by_prompt, per_row, rtol=1e-5, atol=1e-4)


def test_sharing_prompts_trains_like_one_pass_per_row():
    """All terms on (retain, unlikelihood, preference): the two paths give the same losses and weights up to
    float summation order, and they are different configs for checkpoints."""
    cfg = dict(steps=5, batch_size=3, lr=1e-2, targets=ALL)
    objectives = terms([0, 3, 5], {1: "no", 2: "dog", 4: "I cannot"}, {2: "dog", 4: "red", 5: "never mind"})
    runs = {}
    for shared in (True, False):
        model = make_tiny_model()
        runs[shared] = (finetune(model, objectives, FinetuneConfig(share_prompts=shared, **cfg), progress=False), model)
    (a, model_a), (b, model_b) = runs[True], runs[False]
    for x, y in [(a.losses, b.losses)] + [(a.terms[k], b.terms[k]) for k in b.terms]:
        assert len(x) == len(y) == 5
        assert all((u is None) == (v is None) for u, v in zip(x, y))
        assert all(abs(u - v) < 1e-4 * max(1.0, abs(v)) for u, v in zip(x, y) if v is not None)
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert FinetuneConfig(share_prompts=False).to_dict() != FinetuneConfig().to_dict()


def test_lora_losses_equal_those_recorded_before_the_trainer_served_every_method():
    """The same seeds, model and data give the recorded per-step figures (the objectives reproduce the old
    index-keyed loss terms, in the same batches and the same order of floating-point operations)."""
    plain = finetune(make_tiny_model(), EXAMPLES, FinetuneConfig(steps=8, batch_size=3, lr=1e-2, targets=ALL),
                     progress=False)
    assert plain.terms["nll"] == pytest.approx(RECORDED["plain"], rel=1e-6) and plain.losses == plain.terms["nll"]
    both = finetune(make_tiny_model(), terms([0, 3, 5], {1: "no", 2: "dog", 4: "I cannot"},
                                             {2: "dog", 4: "red", 5: "never mind"}),
                    FinetuneConfig(steps=8, batch_size=3, lr=1e-2, targets=ALL), progress=False)
    recorded = RECORDED["terms"]
    for name, old in (("nll", "losses"), ("retain_kl", "retain_kl"), ("unlikelihood", "unlikelihood"),
                      ("preference", "preference")):
        assert [x is None for x in both.terms[name]] == [x is None for x in recorded[old]], name
        for new, ref in zip(both.terms[name], recorded[old]):
            if ref is not None:
                assert new == pytest.approx(ref, rel=1e-5, abs=1e-9), name
    steps = zip(*(both.terms[k] for k in ("nll", "retain_kl", "unlikelihood", "preference")))
    assert both.losses == pytest.approx([sum(v for v in vals if v is not None) for vals in steps])


def test_bfloat16_autocast_trains_like_float32_and_keeps_float32_state(tmp_path):
    """Mixed precision: the training forward runs bfloat16 matrix products (seen by a hook), the losses follow
    the float32 run closely, the LoRA factors stay float32, and the two precisions do not share checkpoints."""
    kw = dict(steps=6, batch_size=3, lr=1e-2, targets=ALL)
    objectives = terms([0, 1], {2: "no"})
    results, dtypes = {}, {}
    for precision in ("float32", "bfloat16"):
        model = make_tiny_model()
        seen = set()
        model.blocks[0].hook_mlp_out.add_hook(lambda act, hook: seen.add(act.dtype))
        lora_dtypes = set()
        cfg = FinetuneConfig(precision=precision, merge=False, **kw)
        results[precision] = finetune(model, objectives, cfg, progress=False, callback=lambda step, m: lora_dtypes.update(
            p.dtype for n, p in m.named_parameters() if "lora_" in n))
        model.reset_hooks(including_permanent=True)
        dtypes[precision] = seen
        assert lora_dtypes == {torch.float32}
        results[precision].merge()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert dtypes["float32"] == {torch.float32} and torch.bfloat16 in dtypes["bfloat16"]
    model = make_tiny_model()  # the losses' logits stay float32 under autocast
    resid = final_resid(model, TOKENS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = unembed(model, resid[0])
    assert logits.dtype == torch.float32 and torch.equal(logits, unembed(model, resid[0]))
    f32, b16 = results["float32"], results["bfloat16"]
    assert max(abs(a - b) for a, b in zip(f32.losses, b16.losses)) < 0.05 * max(f32.losses)
    assert b16.losses[-1] < b16.losses[0]
    finetune(make_tiny_model(), objectives, FinetuneConfig(precision="bfloat16", **kw), run_dir=tmp_path, progress=False)
    with pytest.raises(MechsafeError, match="another config"):
        finetune(make_tiny_model(), objectives, FinetuneConfig(**kw), run_dir=tmp_path, progress=False)


def test_merge_equals_adapted_outputs_and_leaves_a_plain_model(tiny_model):
    names = [n for n, _ in tiny_model.named_parameters()]
    tuner = attach_lora(tiny_model, FinetuneConfig(targets=ALL, layers="0,2"))
    _randomize_b(tiny_model)
    with torch.no_grad():
        adapted = tiny_model(TOKENS)
        w_in = adapted_weight(tiny_model, "mlp.W_in", 0)
        w_q = adapted_weight(tiny_model, "attn.W_Q", 2)
    model = merge_lora(tuner)
    assert model is tiny_model and isinstance(model, HookedTransformer) and not has_lora(model)
    assert [n for n, _ in model.named_parameters()] == names
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.blocks[0].mlp.W_in, w_in)
    torch.testing.assert_close(model.blocks[2].attn.W_Q, w_q)
    assert model.blocks[0].mlp.W_in.T.is_contiguous() and model.blocks[2].attn.W_O.permute(2, 0, 1).is_contiguous()


def _merged_weights(model) -> dict[str, torch.Tensor]:
    """Every adapted weight as ``W + scale * B @ A``, differentiable in the LoRA factors (the parameter-LoRA view)."""
    out = {}
    for name, module in model.named_modules():
        if has_lora(module) and hasattr(module, "weights") and name.count(".") == 2:
            for w in module.weights:
                out[f"{name}.{w}"] = getattr(module.get_base_layer(), w) + module.get_delta_weight("default", w)
    return out


@pytest.mark.parametrize("ungrouped", [False, True])
def test_low_rank_branch_equals_the_merged_weights_in_values_and_gradients(tiny_model, ungrouped):
    tuner = attach_lora(tiny_model, FinetuneConfig(targets=ALL))
    tiny_model.cfg.ungroup_grouped_query_attention = ungrouped  # K/V heads repeated before hook_k/hook_v
    _randomize_b(tiny_model)
    factors = {n: p for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert len(factors) == 2 * 7 * 3
    logp = torch.log_softmax(tiny_model(TOKENS), dim=-1)
    loss = logp[..., 5].sum() + logp[..., 40].sum()
    grads = torch.autograd.grad(loss, list(factors.values()))
    reference = make_tiny_model()  # the same weights, each adapted one replaced by W + scale * B @ A
    reference.cfg.ungroup_grouped_query_attention = ungrouped
    ref_logits = torch.func.functional_call(reference, _merged_weights(tiny_model), (TOKENS,), strict=False)
    torch.testing.assert_close(logp, torch.log_softmax(ref_logits, dim=-1), rtol=1e-5, atol=1e-5)
    ref_logp = torch.log_softmax(ref_logits, dim=-1)
    ref_grads = torch.autograd.grad(ref_logp[..., 5].sum() + ref_logp[..., 40].sum(), list(factors.values()))
    for name, g, r in zip(factors, grads, ref_grads):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()), msg=name)
    # the branch's hooks live only during a module's forward pass
    assert all(not hp._forward_hooks for hp in tiny_model.hook_dict.values())
    merge_lora(tuner)


def test_hooks_see_adapted_activations_and_their_edits_reach_the_branch(tiny_model):
    merged = make_tiny_model()
    tuner = attach_lora(tiny_model, FinetuneConfig(targets=ALL))
    _randomize_b(tiny_model)
    with torch.no_grad():
        for name, weight in _merged_weights(tiny_model).items():
            merged.get_parameter(name).copy_(weight)
    names = [ms.hooks.hook_name(tiny_model, h, 1) for h in ("mlp_pre", "mlp_pre_linear", "attn_q", "attn_k", "mlp_post", "attn_z")]
    _, cache = tiny_model.run_with_cache(TOKENS, names_filter=names)
    _, ref_cache = merged.run_with_cache(TOKENS, names_filter=names)
    for name in names:  # a hook (here the cache's) sees the adapted activation at the branch's own hook point
        torch.testing.assert_close(cache[name], ref_cache[name], rtol=1e-5, atol=1e-5)

    def zero_half(act, hook):  # an edit of W_out's and W_O's inputs must reach the low-rank branch too
        act = act.clone()
        act[..., ::2] = 0
        return act

    edits = [(ms.hooks.hook_name(tiny_model, "mlp_post", 2), zero_half), (ms.hooks.hook_name(tiny_model, "attn_z", 0), zero_half)]
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.run_with_hooks(TOKENS, fwd_hooks=edits),
                                   merged.run_with_hooks(TOKENS, fwd_hooks=edits), rtol=1e-5, atol=1e-5)
    merge_lora(tuner)


def test_lora_dropout_drops_only_the_branch_input_while_training(tiny_model):
    with torch.no_grad():
        base = tiny_model(TOKENS)
    attach_lora(tiny_model, FinetuneConfig(targets=ALL, dropout=0.5))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(TOKENS), base)  # B = 0: nothing to drop
        _randomize_b(tiny_model)
        adapted = tiny_model(TOKENS)
        tiny_model.train()
        first, second = tiny_model(TOKENS), tiny_model(TOKENS)
        tiny_model.eval()
        assert torch.equal(tiny_model(TOKENS), adapted)
    assert not torch.allclose(first, second) and not torch.allclose(first, adapted)


def test_unsupported_attention_settings_fail_with_one_line_errors(tiny_model):
    tiny_model.cfg.use_attn_result = True  # at attach time: an error and no adapter anywhere
    with pytest.raises(MechsafeError, match="use_attn_result=False"):
        attach_lora(tiny_model, FinetuneConfig(targets=("mlp.W_in", "attn.W_O")))
    assert not has_lora(tiny_model)
    tiny_model.cfg.use_attn_result = False
    attach_lora(tiny_model, FinetuneConfig(targets=("attn.W_O",)))  # switched on later: an error at the forward pass
    tiny_model.cfg.use_attn_result = True
    with pytest.raises(MechsafeError, match="use_attn_result=False"):
        tiny_model(TOKENS)
    tiny_model.cfg.use_attn_result = False


def test_attention_targets_work_with_keyword_calls_and_hooks(tiny_model):
    with torch.no_grad():
        base = tiny_model(TOKENS)
    tuner = attach_lora(tiny_model, FinetuneConfig(targets=("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O")))
    assert "TransformerLensLora" in type(tiny_model.blocks[1].attn).__name__
    assert not has_lora(tiny_model.blocks[1].mlp)  # MLP untouched
    _randomize_b(tiny_model)
    seen = []
    name = ms.hooks.hook_name(tiny_model, "attn_out", 1)
    logits = tiny_model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda act, hook: seen.append(act.shape))])
    assert seen and not torch.allclose(logits, base)
    logits.sum().backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters() if "lora_A" in n}
    assert set(grads) == {f"blocks.{i}.attn.lora_A.default.{w}" for i in range(3) for w in ("W_Q", "_W_K", "_W_V", "W_O")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # a delta of W_K lands on the grouped _W_K, in TransformerLens shape
    assert adapted_weight(tiny_model, "attn.W_K", 0).shape == tiny_model.blocks[0].attn.base_layer._W_K.shape
    merge_lora(tuner)


def test_callback_sees_adapted_weights_during_training(tiny_model):
    snaps = {}
    cfg = FinetuneConfig(steps=4, batch_size=3, lr=1e-2, callback_every=2, targets=("mlp.W_out",))
    finetune(tiny_model, EXAMPLES, cfg, progress=False,
             callback=lambda step, m: snaps.__setitem__(step, adapted_weight(m, "mlp.W_out", 1)))
    assert sorted(snaps) == [0, 2, 4]
    assert not torch.equal(snaps[0], snaps[4])
    torch.testing.assert_close(snaps[4], tiny_model.blocks[1].mlp.W_out)


def test_unmerged_result_keeps_adapters_until_merged(tiny_model):
    result = finetune(tiny_model, EXAMPLES, FinetuneConfig(steps=2, batch_size=3, lr=1e-2, merge=False), progress=False)
    assert not result.merged and has_lora(tiny_model)
    with torch.no_grad():
        adapted = tiny_model(TOKENS)
    model = result.merge()
    assert not has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), adapted, rtol=1e-5, atol=1e-5)


def test_example_order_is_a_seeded_permutation_per_epoch():
    cfg = FinetuneConfig(batch_size=2, grad_accum=2)
    first_epoch = [i for s in range(3) for mb in example_order(s, cfg, 12) for i in mb]
    assert sorted(first_epoch) == list(range(12))
    assert example_order(1, cfg, 12) == example_order(1, FinetuneConfig(batch_size=2, grad_accum=2), 12)
    assert example_order(0, cfg, 12) != example_order(0, FinetuneConfig(batch_size=2, grad_accum=2, seed=1), 12)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(targets=("mlp.W_up",)), "unknown weight kind"),
    (dict(method="adapters"), "unknown fine-tuning method"),
    (dict(rank=0), "rank"),
    (dict(dropout=1.0), "dropout"),
    (dict(steps=3, epochs=1.0), "either steps or epochs"),
    (dict(schedule="cosine"), "schedule"),
    (dict(lr=-1.0), "lr"),
    (dict(precision="float16"), "unknown precision"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(MechsafeError, match=needle):
        FinetuneConfig(**kwargs)


def test_bad_examples_and_layers(tiny_model):
    with pytest.raises(MechsafeError, match="nothing to train on"):
        finetune(tiny_model, [], progress=False)
    with pytest.raises(MechsafeError, match="non-empty"):
        ResponseNLL([])
    with pytest.raises(MechsafeError, match="prompt, response"):
        finetune(tiny_model, [("only a prompt",)], progress=False)
    with pytest.raises(MechsafeError):
        finetune(tiny_model, EXAMPLES, FinetuneConfig(layers="7"), progress=False)
    assert not has_lora(tiny_model)


def test_truncated_responses_do_not_close_the_turn(tiny_model):
    tok = tiny_model.tokenizer
    closed, cut = encode_examples(tok, [("hi", "abc"), ("hi", "abc", False)])
    assert closed.ids[:-1] == cut.ids and closed.ids[-1] == tok.eos_token_id
    long = encode_examples(tok, [("hi", "x" * 500)], max_length=64)[0]
    assert len(long) == 64 and long.prompt_len < 64


def test_a_prefix_opens_the_response_unscored(tiny_model):
    tok = tiny_model.tokenizer
    plain, prefixed = encode_examples(tok, [("hi", "abc"), ("hi", " abc", True, "xy z")])
    pre = tok("xy z", add_special_tokens=False)["input_ids"]
    resp = tok(" abc", add_special_tokens=False)["input_ids"]
    assert prefixed.ids == plain.ids[:plain.prompt_len] + pre + resp + [tok.eos_token_id]
    assert prefixed.prompt_len == plain.prompt_len + len(pre)
    tokens, mask = collate([prefixed], chat.pad_id(tok))
    assert mask.sum() == len(resp) + 1 and mask[0, :prefixed.prompt_len - 1].sum() == 0  # the prefix is not scored
    with torch.no_grad():  # the response NLL is that of the tokens after the prefix, given prompt and prefix
        expected = float((token_nll(tiny_model, tokens) * mask).sum() / mask.sum())
    assert float(response_nll(tiny_model, [("hi", " abc", True, "xy z")])[0]) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(MechsafeError, match="prefix"):
        encode_examples(tok, [("hi", "abc", True, "word " * 80)], max_length=64)
    with pytest.raises(MechsafeError, match="prefix"):
        encode_examples(tok, [("hi", "abc", True, 3)])


def test_coarse_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    gen = torch.Generator().manual_seed(0)
    ref_logits, logits = torch.randn(5, 40, generator=gen) * 2, torch.randn(5, 40, generator=gen) * 2
    ref = torch.log_softmax(ref_logits, -1)
    full = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)  # hand-written KL(ref || q)
    top = ref.topk(40)
    torch.testing.assert_close(coarse_kl(logits, top.values, top.indices), full, rtol=1e-4, atol=1e-5)
    top8 = ref.topk(8)
    coarse = coarse_kl(logits, top8.values, top8.indices)
    assert bool((coarse >= -1e-6).all()) and bool((coarse <= full + 1e-5).all()) and bool((coarse < full).any())
    assert float(coarse_kl(ref_logits, top8.values, top8.indices).abs().max()) < 1e-5  # same distribution: 0


def _retained_kl(base_refs, model, seqs):
    """Mean exact KL(base || model) over every position of ``seqs`` (references cover the whole vocabulary)."""
    tokens, _ = chat.pad_right([s.ids for s in seqs], 0)
    with torch.no_grad():
        resid = final_resid(model, tokens)
        return float(retain_kl_sum(model, resid, list(range(len(seqs))), base_refs)) / sum(len(s) - 1 for s in seqs)


def test_retain_term_starts_at_zero_and_keeps_retained_examples_near_the_base_model():
    retain = [3, 4, 5]
    seqs = [encode_examples(make_tiny_model().tokenizer, EXAMPLES)[i] for i in retain]
    base_refs = reference_topk(make_tiny_model(), seqs, k=10_000)
    drift = {}
    for weight in (0.0, 20.0):
        model = make_tiny_model()
        cfg = FinetuneConfig(steps=10, batch_size=3, lr=1e-2)
        result = finetune(model, terms(retain, weight=weight, top_k=8) if weight else terms(), cfg, progress=False)
        drift[weight] = _retained_kl(base_refs, model, seqs)
        if weight:
            assert len(result.terms["retain_kl"]) == 10 and abs(result.terms["retain_kl"][0]) < 1e-6  # LoRA starts as the identity
        else:
            assert "retain_kl" not in result.terms
    assert drift[20.0] < 0.5 * drift[0.0], drift


def test_retain_reference_carries_the_response_nll_the_preference_term_reuses():
    tok = make_tiny_model().tokenizer
    seqs = encode_examples(tok, EXAMPLES)
    refs = reference_topk(make_tiny_model(), seqs, k=5, batch_size=4)  # batched by length, returned in input order
    nll, _ = sequence_nll(make_tiny_model(), seqs)
    assert [r.response_nll for r in refs] == pytest.approx(nll.tolist(), rel=1e-5)
    assert [r.logp.shape[0] for r in refs] == [len(s) - 1 for s in seqs]
    rejected = {1: "no", 3: "dog dog"}
    rej = dict(zip(rejected, encode_examples(tok, [(EXAMPLES[i][0], t, False) for i, t in rejected.items()])))
    fresh = reference_pairs(make_tiny_model(), seqs, rej)
    reused = reference_pairs(make_tiny_model(), seqs, rej, {1: refs[1].response_nll})
    for i in rejected:
        assert reused[i].ref_chosen_nll == pytest.approx(fresh[i].ref_chosen_nll, rel=1e-5)
        assert reused[i].ref_rejected_nll == pytest.approx(fresh[i].ref_rejected_nll, rel=1e-5)


def test_objective_arguments_are_checked(tiny_model):
    with pytest.raises(MechsafeError, match="weight"):
        RetainKL(EXAMPLES, weight=0.0)
    with pytest.raises(MechsafeError, match="top_k"):
        RetainKL(EXAMPLES, top_k=0)
    with pytest.raises(MechsafeError, match="one negative response per example"):
        Unlikelihood(EXAMPLES[:2], ["no"])
    with pytest.raises(MechsafeError, match="non-empty"):
        Unlikelihood(EXAMPLES[:1], [" "])
    with pytest.raises(MechsafeError, match="one rejected response per example"):
        Preference(EXAMPLES[:1], [])
    for beta in (0.0, -1.0, float("inf")):
        with pytest.raises(MechsafeError, match="beta"):
            Preference(EXAMPLES[:1], ["no"], beta=beta)
    with pytest.raises(MechsafeError, match="repeat a kind"):
        finetune(tiny_model, [ResponseNLL(EXAMPLES[:2]), ResponseNLL(EXAMPLES[2:])], progress=False)
    with pytest.raises(MechsafeError, match="not an objective"):
        finetune(tiny_model, [ResponseNLL(EXAMPLES), "retain"], progress=False)
    assert not has_lora(tiny_model)


def test_objectives_pool_shared_examples_and_keep_repeats():
    """An example two objectives name runs once per step; an example one objective lists twice is drawn twice."""
    model = make_tiny_model()
    nll = ResponseNLL(EXAMPLES + [EXAMPLES[0]])
    retain = RetainKL([EXAMPLES[0], EXAMPLES[0], EXAMPLES[2]])
    extra = Unlikelihood([("a new prompt", "its answer")], ["no"])
    result = finetune(model, [nll, retain, extra], FinetuneConfig(steps=1, batch_size=8), progress=False)
    assert nll.units == [0, 1, 2, 3, 4, 5, 6] and retain.units == [0, 6, 2] and extra.units == [7]
    assert result.steps == 1 and set(result.terms) == {"nll", "retain_kl", "unlikelihood"}


def test_finetuned_model_saves_and_loads_with_identical_logits(hf_dir, tmp_path):
    model = ms.load_model(str(hf_dir), processing="none")
    finetune(model, EXAMPLES, FinetuneConfig(steps=3, batch_size=3, lr=1e-2, targets=ALL), progress=False)
    out = ms.save_model(model, tmp_path / "tuned", base_model=str(hf_dir), note="lora")
    back = ms.load_model(str(out))
    with torch.no_grad():
        assert torch.equal(back(TOKENS), model(TOKENS))
    assert model_info(back).extra["note"] == "lora" and model_info(back).extra["base_model"] == str(hf_dir)


def test_unlikelihood_is_minus_log_one_minus_p():
    p = torch.tensor([1e-9, 0.1, 0.5, 0.9, 0.999])
    torch.testing.assert_close(unlikelihood(-torch.log(p)), -torch.log(1 - p), rtol=1e-4, atol=1e-7)
    assert torch.isfinite(unlikelihood(torch.zeros(1))).all()  # p = 1 is clamped, not infinite


def test_unlikelihood_term_starts_at_the_hand_computed_value_and_lowers_the_negatives():
    negatives = {0: "hi!", 3: "goodbye", 5: "1 2 3"}  # their own targets: training makes them probable
    tok = make_tiny_model().tokenizer
    seqs = encode_examples(tok, [(EXAMPLES[i][0], text, False) for i, text in negatives.items()])
    assert all(s.ids[-1] != tok.convert_tokens_to_ids(chat.end_of_turn(tok)) for s in seqs)  # no end of turn

    def mean_unlikelihood(model):  # mean -log(1 - p(negative | prompt))
        tokens, mask = collate(seqs, chat.pad_id(tok))
        with torch.no_grad():
            logp = -masked_nll(model, tokens, mask)
        return float((-torch.log1p(-logp.exp())).mean())

    expected_first = mean_unlikelihood(make_tiny_model())
    end = {}
    for weight in (0.0, 5.0):
        model = make_tiny_model()
        cfg = FinetuneConfig(steps=40, batch_size=6, lr=3e-2)
        result = finetune(model, terms(negatives=negatives, weight=weight) if weight else terms(), cfg, progress=False)
        end[weight] = mean_unlikelihood(model)
        if weight:  # one batch holds every example, so step 0 sees all negatives at the untrained model
            assert len(result.terms["unlikelihood"]) == 40
            assert result.terms["unlikelihood"][0] == pytest.approx(expected_first, rel=1e-4)
    assert end[0.0] > 10 * expected_first and end[5.0] < 0.75 * end[0.0], (expected_first, end)


def test_dpo_loss_equals_the_hand_computed_value():
    pairs = [Pair(rejected=None, ref_chosen_nll=2.0, ref_rejected_nll=2.0),
             Pair(rejected=None, ref_chosen_nll=5.0, ref_rejected_nll=1.0)]
    loss = dpo_loss(torch.tensor([1.0, 5.0]), torch.tensor([3.0, 1.0]), pairs, beta=0.1)
    # margins: (2 - 1) - (2 - 3) = 2 and 0: -log sigmoid(0.2) and log 2
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.2)), math.log(2)]))


def test_preference_term_starts_at_log_two_and_widens_the_margin():
    rejected = {0: "bye", 2: "dog dog", 4: "red"}
    tok = make_tiny_model().tokenizer
    seqs = encode_examples(tok, EXAMPLES)
    rej = encode_examples(tok, [(EXAMPLES[i][0], text, False) for i, text in rejected.items()])
    ref = reference_pairs(make_tiny_model(), seqs, dict(zip(rejected, rej)))
    chosen_nll, _ = sequence_nll(make_tiny_model(), [seqs[i] for i in rejected])
    assert [ref[i].ref_chosen_nll for i in rejected] == pytest.approx(chosen_nll.tolist())

    def margin(model):  # mean log-probability margin of chosen over rejected, relative to the starting model
        c, _ = sequence_nll(model, [seqs[i] for i in rejected])
        r, _ = sequence_nll(model, rej)
        return float(sum((ref[i].ref_chosen_nll - ci) - (ref[i].ref_rejected_nll - ri)
                         for i, ci, ri in zip(rejected, c.tolist(), r.tolist())) / len(rejected))

    end = {}
    for weight in (0.0, 2.0):  # (beta 0.1: with 0.5 the term saturates early and the end margins differ by seed noise)
        model = make_tiny_model()
        cfg = FinetuneConfig(steps=30, batch_size=6, lr=3e-2)
        result = finetune(model, terms(rejected=rejected, weight=weight) if weight else terms(), cfg, progress=False)
        end[weight] = margin(model)
        if weight:  # one batch holds every example, so step 0 sees every pair at the untrained model
            pref = result.terms["preference"]
            assert len(pref) == 30 and pref[0] == pytest.approx(math.log(2), rel=1e-4) and pref[-1] < 0.5 * math.log(2)
    assert end[2.0] > end[0.0] + 1, end


def test_a_frozen_mask_keeps_weights_bit_identical_under_full_training_with_weight_decay():
    """20 steps of full fine-tuning with AdamW and weight decay: the frozen neurons (and a frozen bias) do not move
    by a single bit, every other weight moves."""
    model = make_tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_out = ms.weights.weight(model, "mlp.W_out", 1)  # [d_mlp, d_model], neurons on axis 0
    w_in = ms.weights.weight(model, "mlp.W_in", 1)  # [d_model, d_mlp], neurons on axis 1
    frozen = torch.zeros(w_out.n_units, dtype=torch.bool)
    frozen[[0, 5, 17, 40]] = True
    masks = {w_out.name: frozen[:, None], w_in.name: frozen[None, :], "blocks.0.ln1.w": torch.ones(32, dtype=torch.bool)}
    cfg = FinetuneConfig(method="full", steps=20, batch_size=3, lr=1e-2, weight_decay=0.1)
    result = finetune(model, EXAMPLES, cfg, grad_transform=ms.finetune.Freeze(masks), progress=False)
    after = dict(model.named_parameters())
    assert torch.equal(after[w_out.name][frozen], before[w_out.name][frozen])
    assert torch.equal(after[w_in.name][:, frozen], before[w_in.name][:, frozen])
    assert torch.equal(after["blocks.0.ln1.w"], before["blocks.0.ln1.w"])
    assert (after[w_out.name][~frozen] != before[w_out.name][~frozen]).float().mean() > 0.99
    moved = [n for n in before if n != "blocks.0.ln1.w" and not torch.equal(after[n], before[n])]
    assert len(moved) == len(before) - 1  # every other parameter trained (full fine-tuning)
    assert result.merged and result.losses[-1] < result.losses[0]
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are restored
    # without the mask, weight decay alone would have moved the frozen entries
    free = make_tiny_model()
    finetune(free, EXAMPLES, cfg, progress=False)
    assert not torch.equal(dict(free.named_parameters())[w_out.name][frozen], before[w_out.name][frozen])


def test_a_projection_keeps_every_update_inside_its_subspace():
    model = make_tiny_model()
    handle = ms.weights.weight(model, "mlp.W_in", 2)  # [d_model, d_mlp]
    basis, _ = torch.linalg.qr(torch.randn(handle.shape[0], 5, generator=torch.Generator().manual_seed(0)))
    project = lambda x: basis @ (basis.T @ x)  # noqa: E731 - updates restricted to a 5-dim subspace of the input side
    before = handle.parameter.detach().clone()
    cfg = FinetuneConfig(method="selected", targets=("mlp.W_in",), layers="2", steps=20, batch_size=3, lr=1e-2,
                         weight_decay=0.1)
    finetune(model, EXAMPLES, cfg, grad_transform=ms.finetune.Project({handle.name: project}), progress=False)
    delta = handle.parameter.detach() - before
    assert float(delta.norm()) > 1e-3
    assert float((delta - project(delta)).norm() / delta.norm()) < 1e-6


def test_selected_weights_train_alone():
    model = make_tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(method="selected", targets=("mlp.W_out", "attn.W_K"), layers="1-2", steps=5, batch_size=3,
                         lr=1e-2)
    seen = {}
    finetune(model, EXAMPLES, cfg, progress=False,
             callback=lambda step, m: seen.setdefault("trainable", sorted(n for n, p in m.named_parameters()
                                                                         if p.requires_grad)))
    chosen = ["blocks.1.attn._W_K", "blocks.1.mlp.W_out", "blocks.2.attn._W_K", "blocks.2.mlp.W_out"]
    assert seen["trainable"] == chosen
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == chosen


def test_full_training_resumes_bit_for_bit(tmp_path):
    cfg = FinetuneConfig(method="full", steps=4, batch_size=3, lr=1e-3, checkpoint_every=2)
    straight = make_tiny_model()
    finetune(straight, EXAMPLES, cfg, progress=False)

    def crash(step, model):
        if step == 3:
            raise KeyboardInterrupt

    interrupted = make_tiny_model()
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, EXAMPLES, cfg, run_dir=tmp_path, callback=crash, progress=False)
    resumed = make_tiny_model()  # a fresh process: the base weights, then the checkpoint
    result = finetune(resumed, EXAMPLES, cfg, run_dir=tmp_path, progress=False)
    assert result.resumed_from == 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    (tmp_path / "checkpoints" / "step-000004" / "trained.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MechsafeError, match="corrupt"):
        finetune(make_tiny_model(), EXAMPLES, cfg, run_dir=tmp_path, progress=False)


def test_grad_transforms_are_checked(tiny_model):
    with pytest.raises(MechsafeError, match="not trained"):
        finetune(tiny_model, EXAMPLES, FinetuneConfig(method="selected", targets=("mlp.W_in",), steps=1),
                 grad_transform=ms.finetune.Freeze({"blocks.0.mlp.W_out": torch.ones(1, dtype=torch.bool)}),
                 progress=False)
    with pytest.raises(MechsafeError, match="does not fit"):
        finetune(tiny_model, EXAMPLES, FinetuneConfig(method="selected", targets=("mlp.W_in",), steps=1),
                 grad_transform=ms.finetune.Freeze({"blocks.0.mlp.W_in": torch.ones(3, 3, dtype=torch.bool)}),
                 progress=False)
    with pytest.raises(MechsafeError, match="at least one"):
        ms.finetune.Freeze({})
    assert all(p.requires_grad for p in tiny_model.parameters())


def test_a_finished_run_loads_back(tmp_path):
    from mechsafe.finetune import FinetuneResult

    cfg = FinetuneConfig(steps=3, batch_size=3, lr=1e-2, targets=ALL)
    result = finetune(make_tiny_model(), terms([0]), cfg, run_dir=tmp_path, progress=False)
    back = FinetuneResult.load(tmp_path)
    assert back.to_dict() | {"seconds": 0} == result.to_dict() | {"seconds": 0, "run_dir": str(tmp_path)}
    with pytest.raises(MechsafeError, match="does not exist"):
        FinetuneResult.load(tmp_path / "nowhere")


def test_gradient_transforms_keep_training_weights_stored_in_the_linear_layout():
    """Weights loaded by mechsafe keep a transposed storage (models.linear_layout); a transform's gradient must land in
    each gradient buffer as it is laid out, or the fused optimizer stops updating the parameter."""
    from conftest import make_tiny_model

    from mechsafe.finetune import Freeze
    from mechsafe.models import linear_layout
    from mechsafe.weights import select

    runs = {}
    for frozen in (False, True):
        model = linear_layout(make_tiny_model())
        hs = select(model, "mlp.W_out", "all")
        assert not hs[0].parameter.is_contiguous()
        before = {h.name: h.parameter.detach().clone() for h in hs}
        masks = {h.name: torch.zeros(h.shape, dtype=torch.bool) for h in hs}
        masks[hs[0].name][0, 0] = True
        cfg = FinetuneConfig(method="selected", targets=("mlp.W_out",), lr=1e-2, steps=3, batch_size=2)
        result = finetune(model, EXAMPLES, cfg, grad_transform=Freeze(masks) if frozen else None, progress=False)
        runs[frozen] = (result.losses, {h.name: h.parameter.detach() - before[h.name] for h in hs})
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-3)
    for name, moved in runs[True][1].items():
        assert float(moved.abs().max()) > 0.5 * float(runs[False][1][name].abs().max())
    assert float(runs[True][1][select(make_tiny_model(), "mlp.W_out", 0)[0].name][0, 0]) == 0.0
