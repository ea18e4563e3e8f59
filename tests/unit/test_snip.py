"""SNIP scores, groups, ActSVD and pruning edits on the tiny model (mechsafe.snip, mechsafe.interventions)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from mechsafe import interventions as iv
from mechsafe.errors import MechsafeError
from mechsafe.forward import collate, encode_examples, token_nll
from mechsafe.snip import GroupConfig, ScoreConfig, ScoreStore, StudyConfig, compute_scores, make_groups
from mechsafe.snip import scores as snip_scores
from mechsafe.snip.actsvd import input_grams, output_directions
from mechsafe.snip.groups import Group, random_like, set_difference, top_mask, unit_scores
from mechsafe.weights import fingerprint, select, unit_masks

EXAMPLES = [("how do I bake bread", "mix flour and water"), ("name a colour", "blue is one"),
            ("say hi", "hello there friend"), ("count to three", "one two three")]


def hand_scores(model, examples, batch_size, short=None):
    """|W| * sum over batches of |dL/dW| with plain autograd, batch by batch."""
    seqs = encode_examples(model.tokenizer, examples)
    seqs = snip_scores.shorten(seqs, short) if short else seqs
    acc, signed = {}, {}
    for batch in snip_scores.batches(seqs, batch_size):
        model.zero_grad()
        snip_scores.batch_loss(model, batch).backward()
        for name, p in model.named_parameters():
            acc[name] = acc.get(name, 0) + p.grad.abs()
            signed[name] = signed.get(name, 0) + p.grad
    model.zero_grad()
    params = dict(model.named_parameters())
    return ({n: (params[n].abs() * a).detach() for n, a in acc.items()},
            {n: (params[n].abs() * g.abs()).detach() for n, g in signed.items()})


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_snip_is_the_sum_of_per_batch_absolute_gradients(tmp_path, micro_batch):
    model = make_tiny_model()
    store = compute_scores(model, EXAMPLES, ScoreConfig(data="x.jsonl", batch_size=2, micro_batch=micro_batch),
                           root=tmp_path, progress=False)
    want, abs_of_sum = hand_scores(model, EXAMPLES, 2)
    got = snip_scores.scores_of(store, model)
    assert len(got) == 3 * 7
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-9)
    # with two batches, |sum of gradients| differs from the sum of |gradients|: SNIP is the latter
    name = select(model, "mlp.W_in", 1)[0].name
    assert (want[name] - abs_of_sum[name]).abs().max() > 1e-3 * want[name].abs().max()
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def test_the_loss_scores_response_tokens_only():
    model = make_tiny_model()
    seqs = encode_examples(model.tokenizer, EXAMPLES[:2])
    tokens, _ = collate(seqs, 0)
    nll = token_nll(model, tokens)
    per_row = [(nll[b, s.prompt_len - 1:len(s) - 1]) for b, s in enumerate(seqs)]
    want = torch.cat(per_row).mean()
    torch.testing.assert_close(snip_scores.batch_loss(model, seqs), want)
    # changing a prompt's text changes the loss only through the response's context: a response-free example
    # would have no scored token at all
    short = snip_scores.shorten(seqs, 2)
    assert [len(s) - s.prompt_len for s in short] == [2, 2]
    assert [s.ids[: s.prompt_len + 2] for s in seqs] == [s.ids for s in short]


def test_safety_short_scores_only_the_first_response_tokens(tmp_path):
    model = make_tiny_model()
    long = compute_scores(model, EXAMPLES, ScoreConfig(data="x.jsonl", batch_size=1), root=tmp_path, progress=False)
    short = compute_scores(model, EXAMPLES, ScoreConfig(data="safety-short", short_tokens=3, batch_size=1),
                           root=tmp_path, progress=False)
    want, _ = hand_scores(model, EXAMPLES, 1, short=3)
    for name, tensor in snip_scores.scores_of(short, model).items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-9)
    assert short.path != long.path
    a, b = short.layer(0)["mlp.W_out"], long.layer(0)["mlp.W_out"]
    assert not torch.allclose(a, b)


def test_scores_are_reused_and_resume_after_an_interruption(tmp_path, monkeypatch):
    model = make_tiny_model()
    cfg = ScoreConfig(data="x.jsonl", batch_size=1, layers_per_pass=2)
    whole = compute_scores(model, EXAMPLES, cfg, root=tmp_path / "a", progress=False)
    real = snip_scores.batch_loss
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # second pass (blocks 2), third batch
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(snip_scores, "batch_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        compute_scores(model, EXAMPLES, cfg, root=tmp_path / "b", progress=False, checkpoint_s=0)
    path = next((tmp_path / "b").iterdir())
    assert (path / "layer_000.safetensors").is_file() and not (path / "layer_002.safetensors").is_file()
    with pytest.raises(MechsafeError, match="unfinished"):
        ScoreStore.open(path)
    monkeypatch.setattr(snip_scores, "batch_loss", real)
    counted = {"n": 0}
    monkeypatch.setattr(snip_scores, "batch_loss", lambda *a: counted.__setitem__("n", counted["n"] + 1) or real(*a))
    resumed = compute_scores(model, EXAMPLES, cfg, root=tmp_path / "b", progress=False, checkpoint_s=0)
    assert counted["n"] == 2  # only the two batches the interrupted pass had left
    for layer in whole.layers:
        for kind, t in whole.layer(layer).items():
            assert torch.equal(t, resumed.layer(layer)[kind])
    monkeypatch.setattr(snip_scores, "batch_loss", lambda *a: pytest.fail("finished scores must be reused"))
    assert compute_scores(model, EXAMPLES, cfg, root=tmp_path / "b", progress=False).path == resumed.path


def test_float16_scores_and_layer_selection(tmp_path):
    model = make_tiny_model()
    store = compute_scores(model, EXAMPLES, ScoreConfig(data="x.jsonl", kinds=("mlp.W_out", "attn.W_K"), layers="1-2",
                                                        dtype="float16"), root=tmp_path, progress=False)
    assert store.layers == [1, 2] and store.kinds == ["mlp.W_out", "attn.W_K"]
    from safetensors.torch import load_file

    raw = load_file(store.path / "layer_001.safetensors")
    assert raw["attn.W_K"].dtype == torch.float16 and raw["attn.W_K"].shape == model.blocks[1].attn._W_K.shape


def test_set_difference_is_the_set_algebra():
    gen = torch.Generator().manual_seed(0)
    s, u = torch.rand(40, 30, generator=gen), torch.rand(40, 30, generator=gen)
    q, p = 0.1, 0.2
    top_s = set(torch.topk(s.flatten(), 120).indices.tolist())
    top_u = set(torch.topk(u.flatten(), 240).indices.tolist())
    mask = set_difference(s, u, q, p)
    assert set(torch.nonzero(mask.flatten()).flatten().tolist()) == top_s - top_u
    assert int(top_mask(s, q).sum()) == 120
    r = random_like(mask, torch.Generator().manual_seed(1))
    assert int(r.sum()) == int(mask.sum()) and not torch.equal(r, mask)


def test_unit_scores_sum_the_slices_of_neurons_and_heads():
    model = make_tiny_model()
    scores = {h.kind: torch.rand(h.shape) for h in select(model, layers=0)}
    units = unit_scores(model, scores)
    n = 5
    want = scores["mlp.W_in"][:, n].sum() + scores["mlp.W_gate"][:, n].sum() + scores["mlp.W_out"][n].sum()
    torch.testing.assert_close(units["neuron"][n], want.double())
    h, group = 3, model.cfg.n_heads // model.cfg.n_key_value_heads
    want = (scores["attn.W_Q"][h].sum() + scores["attn.W_O"][h].sum()
            + (scores["attn.W_K"][h // group].sum() + scores["attn.W_V"][h // group].sum()) / group)
    torch.testing.assert_close(units["head"][h], want.double())


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    model = make_tiny_model()
    root = tmp_path_factory.mktemp("scores")
    safety = compute_scores(model, EXAMPLES[:2], ScoreConfig(data="safety"), root=root, progress=False)
    utility = compute_scores(model, EXAMPLES[2:], ScoreConfig(data="utility"), root=root, progress=False)
    return model, safety, utility


@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_groups_random_matches_set_difference_per_module_and_layer(scored, granularity, tmp_path):
    model, safety, utility = scored
    cfg = GroupConfig(granularity=granularity, top_fraction=0.2, safety_q=0.3, utility_p=0.3, seed=3)
    groups = make_groups(model, safety, utility, cfg)
    sd, rnd = groups["set-difference"], groups["random"]
    assert sd.n_selected > 0
    if granularity == "weight":
        assert sd.counts() == rnd.counts() and sd.masks.keys() == rnd.masks.keys()
        s = snip_scores.scores_of(safety, model)
        u = snip_scores.scores_of(utility, model)
        for name, mask in sd.masks.items():
            assert torch.equal(mask, top_mask(s[name], 0.3) & ~top_mask(u[name], 0.3))
            assert int(groups["top-safety"].masks[name].sum()) == int(0.2 * mask.numel() + 0.5)
    else:
        def per(g):
            out = {}
            for unit in g.units:
                out[(unit["layer"], unit["kind"])] = out.get((unit["layer"], unit["kind"]), 0) + 1
            return out
        assert per(sd) == per(rnd) and sd.units != rnd.units
        assert {u["kind"] for u in groups["top-safety"].units} == {"neuron", "head"}
        # a unit's weights are in its mask
        unit = sd.units[0]
        want = unit_masks(model, [(unit["layer"], unit["kind"], unit["index"])])
        assert all(bool((sd.masks[n] & m).sum() == m.sum()) for n, m in want.items())
    sd.save(tmp_path)
    back = Group.load(tmp_path / "set-difference.json")
    assert back.counts() == sd.counts() and back.units == sd.units
    info = json.loads((tmp_path / "set-difference.json").read_text())
    assert info["sparsity"] == pytest.approx(sd.n_selected / sum(p.numel() for p in (h.parameter for h in select(model))))


def test_groups_and_scores_refuse_another_model(scored, tmp_path):
    model, safety, utility = scored
    other = make_tiny_model(seed=1)
    with pytest.raises(MechsafeError, match="another model"):
        make_groups(other, safety, utility)
    group = make_groups(model, safety, utility, GroupConfig(granularity="weight"))["random"]
    group.save(tmp_path)
    with pytest.raises(MechsafeError, match="another model"):
        Group.load(tmp_path / "random.safetensors").check_model(other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(MechsafeError, match="not a readable group"):
        Group.load(tmp_path / "bad.safetensors")


def test_unit_masks_spare_shared_key_value_heads_unless_the_whole_group_goes():
    model = make_tiny_model()  # 4 query heads sharing 2 key/value heads
    masks = unit_masks(model, [(1, "head", 0), (1, "head", 2), (1, "head", 3), (0, "neuron", 7)])
    name = {h.kind: h.name for h in select(model, layers=1)}
    assert masks[name["attn.W_Q"]][[0, 2, 3]].all() and not masks[name["attn.W_Q"]][1].any()
    assert masks[name["attn.W_K"]][1].all() and not masks[name["attn.W_K"]][0].any()  # heads 2, 3 share kv head 1
    w_in = select(model, "mlp.W_in", 0)[0].name
    assert masks[w_in][:, 7].all() and int(masks[w_in].sum()) == model.cfg.d_model
    with pytest.raises(MechsafeError, match="out of range"):
        unit_masks(model, [(0, "neuron", 10_000)])
    with pytest.raises(MechsafeError, match="unknown unit"):
        unit_masks(model, [(0, "neurone", 1)])


def test_weight_edits_undo_bit_identically():
    model = make_tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = select(model, "mlp.W_out", 1)[0]
    mask = torch.zeros(h.shape, dtype=torch.bool)
    mask[3, :5] = True
    with iv.prune_weights(model, {h.name: mask}):
        assert (h.parameter[3, :5] == 0).all() and h.parameter[3, 5:].ne(0).any()
    edit = iv.ablate_units(model, [(2, "neuron", 4), (0, "head", 1)])
    assert (model.blocks[2].mlp.W_out[4] == 0).all() and (model.blocks[0].attn.W_O[1] == 0).all()
    edit.undo()
    v = torch.linalg.qr(torch.randn(model.cfg.d_model, 2)).Q
    with iv.remove_ranks(model, {select(model, "attn.W_O", 0)[0].name: v}):
        pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(MechsafeError, match="has no weight"):
        iv.prune_weights(model, {"blocks.1.mlp.W_outt": mask})
    with pytest.raises(MechsafeError, match="boolean masks"):
        iv.prune_weights(model, {h.name: mask.float()})


def test_actsvd_removes_the_top_output_directions_and_keeps_the_rest():
    model = make_tiny_model()
    seqs = encode_examples(model.tokenizer, EXAMPLES)
    handles = select(model, ["mlp.W_in", "attn.W_O", "attn.W_K"], layers=1)
    grams = input_grams(model, seqs, handles, batch_size=2)
    dirs = output_directions(model, grams, handles, rank=3)
    # the inputs X on response tokens, recorded directly
    tokens, mask = collate(seqs, 0)
    resp = torch.cat([torch.zeros(mask.shape[0], 1), mask], 1).bool()
    _, cache = model.run_with_cache(tokens)
    for h in handles:
        x = cache[h.input_hook].reshape(*tokens.shape, -1)[resp].double()
        if h.input_norm_weight:
            x = x * dict(model.named_parameters())[h.input_norm_weight].double()
        out = x @ h.as_matrix(h.parameter.detach()).double()  # X W^T
        v_svd = torch.linalg.svd(out, full_matrices=False).Vh[:3].T
        torch.testing.assert_close((v_svd @ v_svd.T), (dirs[h.name].double() @ dirs[h.name].double().T), atol=1e-4, rtol=0)
        with iv.remove_ranks(model, {h.name: dirs[h.name]}):
            new = x @ h.as_matrix(h.parameter.detach()).double()
        v = dirs[h.name].double()
        assert (new @ v).abs().max() < 1e-4 * out.abs().max()
        keep = torch.eye(v.shape[0], dtype=torch.float64) - v @ v.T
        torch.testing.assert_close(new @ keep, out @ keep, atol=1e-4, rtol=1e-4)


def test_actsvd_orthogonal_variant_spares_utility_directions():
    model = make_tiny_model()
    h = select(model, "mlp.W_out", 0)[0]
    d = model.cfg.d_model
    q = torch.linalg.qr(torch.randn(d, 4, dtype=torch.float64)).Q
    vs, vu = q[:, :2].float(), q[:, 1:3].float()
    w = h.as_matrix(h.parameter.detach()).double().T  # W, d_out x d_in
    with iv.remove_ranks(model, {h.name: vs}, keep={h.name: vu}):
        new = h.as_matrix(h.parameter.detach()).double().T
    ps, pu = vs.double() @ vs.double().T, vu.double() @ vu.double().T
    torch.testing.assert_close(new, w - (torch.eye(d, dtype=torch.float64) - pu) @ ps @ w, atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_fix(tmp_path):
    model = make_tiny_model()
    with pytest.raises(MechsafeError, match="unknown weight kind 'mlp.W_inn'.*did you mean mlp.W_in"):
        ScoreConfig(kinds=("mlp.W_inn",))
    with pytest.raises(MechsafeError, match="layer"):
        compute_scores(model, EXAMPLES, ScoreConfig(data="x.jsonl", layers="7"), root=tmp_path, progress=False)
    with pytest.raises(MechsafeError, match="no \\(prompt, response\\) examples"):
        compute_scores(model, [], ScoreConfig(data="x.jsonl"), root=tmp_path, progress=False)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(MechsafeError, match="not a fraction in \\(0, 1\\)"):
            GroupConfig(safety_q=bad)
        with pytest.raises(MechsafeError, match="not a fraction"):
            StudyConfig(sparsities=(bad,))
    with pytest.raises(MechsafeError, match="no SNIP scores"):
        ScoreStore.open(tmp_path)
    from mechsafe.models import ModelInfo

    model.mechsafe_info = ModelInfo(spec="tiny", source="custom", processing="fold")
    with pytest.raises(MechsafeError, match="processing='none'"):
        compute_scores(model, EXAMPLES, ScoreConfig(data="x.jsonl"), root=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(MechsafeError, match="has no column 'response'"):
        from mechsafe.data import load_pairs

        (tmp_path / "p.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
        load_pairs(str(tmp_path / "p.jsonl"))


def test_fingerprint_follows_the_weights():
    a, b = make_tiny_model(), make_tiny_model()
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.blocks[0].mlp.W_in[0, 0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_own_responses_are_generated_until_enough_pass_the_matcher(tmp_path, monkeypatch):
    from mechsafe.snip import data as snip_data

    asked = []

    def fake_answers(model, prompts, max_new_tokens, path, progress=True):
        asked.append(len(prompts))  # every third prompt is refused
        return {p["id"]: ("I can't help with that." if int(p["id"].split(":")[-1]) % 3 == 0 else "Sure, here it is.")
                for p in prompts}

    prompts = [{"id": f"p:{i}", "text": f"prompt {i}"} for i in range(100)]
    monkeypatch.setattr(snip_data, "candidate_prompts", lambda kind: prompts)
    monkeypatch.setattr(snip_data, "cached_answers", fake_answers)
    pairs = snip_data._own_pairs(None, "utility", ScoreConfig(data="utility", n_samples=20), tmp_path, False)
    assert len(pairs) == 20 and all(r == "Sure, here it is." for _, r in pairs)
    assert asked[0] == 25 and sum(asked) < 40  # the shortfall (with a 25% margin), not another full chunk
    order = __import__("numpy").random.default_rng(0).permutation(100)
    assert [p for p, _ in pairs] == [f"prompt {i}" for i in order if i % 3][:20]
    refusals = snip_data._own_pairs(None, "safety", ScoreConfig(data="safety", n_samples=5), tmp_path, False)
    assert all(r.startswith("I can't") for _, r in refusals) and len(refusals) == 5
