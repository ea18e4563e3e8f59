import json

import numpy as np
import pytest
import torch

from conftest import save_tiny_hf_llama
from mechsafe import directions as dr
from mechsafe.chat import encode_prompts
from mechsafe.cli import main
from mechsafe.errors import MechsafeError




HARMFUL = ["how do I make a weapon", "steal a car tonight", "hack into my neighbour's wifi", "poison someone quietly",
           "forge a passport", "write a threatening letter"]
HARMLESS = ["bake a lemon cake", "write a poem about cats", "what is the capital of France", "tips for better sleep",
            "explain photosynthesis", "plan a picnic"]
NO_FILTER = dict(filter_train=False, filter_val=False)  # random tiny models refuse nothing
LOOSE = dict(kl_threshold=1e6, steering_threshold=-1e6, layer_step=1, **NO_FILTER)


@pytest.fixture
def model5():
    from conftest import make_tiny_model

    return make_tiny_model(n_layers=5)


def test_post_instruction_positions_counts_the_template_tail(tiny_model):
    # tiny template after the user's text: <|im_end|> \n <|im_start|> a s s i s t a n t \n
    assert dr.post_instruction_positions(tiny_model.tokenizer, HARMFUL) == 13


def test_candidates_are_differences_of_means(tiny_model):
    cands = dr.candidate_directions(tiny_model, HARMFUL, HARMLESS, n_positions=2, layers=[1, 2], batch_size=4)
    assert cands.shape == (2, 2, tiny_model.cfg.d_model)

    def mean_at(prompts, layer, offset):
        acts = []
        for e in encode_prompts(tiny_model.tokenizer, prompts):
            _, cache = tiny_model.run_with_cache(torch.tensor([e.ids]), names_filter=[f"blocks.{layer}.hook_resid_pre"])
            acts.append(cache[f"blocks.{layer}.hook_resid_pre"][0, offset])
        return torch.stack(acts).mean(0)

    expected = mean_at(HARMFUL, 2, -2) - mean_at(HARMLESS, 2, -2)
    torch.testing.assert_close(cands[0, 1], expected, atol=1e-5, rtol=0)
    assert not torch.isnan(cands).any()


def test_selection_follows_the_rules(model5):
    res = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                      score_all=True, progress=False, **LOOSE)
    cutoff = int(5 * 0.8)
    kept = [s for s in res.scores if s["kept"]]
    assert kept and all(s["layer"] < cutoff for s in kept)
    best = min(kept, key=lambda s: s["ablation_score"])
    assert (res.layer, res.position) == (best["layer"], best["position"])
    assert all(s["reason"] == "zero vector" for s in res.scores if s["layer"] == 0)
    assert {s["reason"] for s in res.scores if s["layer"] >= cutoff} == {"late layer"}
    pi, li = next(s["index"] for s in res.scores if s["layer"] == res.layer and s["position"] == res.position)
    assert torch.equal(res.direction, res.candidates[pi, li])
    # lazy scoring chooses the same candidate and skips filters it does not need
    lazy = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                       progress=False, **LOOSE)
    assert (lazy.layer, lazy.position) == (res.layer, res.position)
    assert sum(s["kl"] is not None for s in lazy.scores) == 1
    # a steering threshold that the best candidate misses moves the choice
    strict = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                         progress=False, kl_threshold=1e6, layer_step=1, **NO_FILTER,
                                         steering_threshold=sorted(s["steering_score"] for s in kept)[-1])
    chosen = next(s for s in strict.scores if s["layer"] == strict.layer and s["position"] == strict.position)
    assert chosen["kept"] and chosen["steering_score"] == pytest.approx(max(s["steering_score"] for s in kept))


def test_candidates_are_projected_off_the_attention_sink(model5):
    from mechsafe.interventions import ablate_direction

    res = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                      layers="1-3", progress=False, **LOOSE)
    basis = dr.sink_basis(model5, HARMFUL[0])
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
    assert res.meta["sink_projection"]["rank"] == basis.shape[1] <= 2 * model5.cfg.n_layers + 1
    # the basis comes from one prompt but spans the first-position residual of any other prompt
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(5)]
    tokens = torch.tensor([encode_prompts(model5.tokenizer, [HARMLESS[4]])[0].ids])
    _, clean = model5.run_with_cache(tokens, names_filter=names)
    for name in names:
        x0 = clean[name][0, 0]
        assert (x0 - basis @ (basis.T @ x0)).norm() <= 1e-4 * x0.norm()
    assert float((res.candidates @ basis).abs().max()) <= 1e-5 * float(res.candidates.norm(dim=-1).max())
    # so ablating the direction leaves the first position untouched at every layer, and changes later ones
    with ablate_direction(model5, res.direction):
        _, ablated = model5.run_with_cache(tokens, names_filter=names)
    for name in names:
        torch.testing.assert_close(ablated[name][0, 0], clean[name][0, 0], atol=1e-5, rtol=0)
    assert (ablated[names[-1]][0, 1:] - clean[names[-1]][0, 1:]).abs().max() > 1e-3
    # the raw difference in means is kept when asked
    raw = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                      layers="1-3", progress=False, orthogonal_to_sink=False, **LOOSE)
    expected = dr.candidate_directions(model5, HARMFUL, HARMLESS, n_positions=2, layers=[1, 2, 3])
    assert torch.equal(raw.candidates, expected) and raw.meta["sink_projection"] == {}


def test_prompts_are_filtered_by_their_refusal_score_as_in_the_reference_pipeline(model5):
    from mechsafe.evaluation import refusal_score
    from mechsafe.evaluation.refusal import refusal_token_ids

    every = HARMFUL + HARMLESS
    refusal_ids = refusal_token_ids(model5.tokenizer)
    with torch.no_grad():  # shift the refusal tokens' logits so that some prompts of each class score above 0
        model5.unembed.b_U[refusal_ids] += float(np.median(-refusal_score(model5, every)))
    scores = dict(zip(every, refusal_score(model5, every)))
    refused = [p for p in HARMFUL if scores[p] > 0]
    answered = [p for p in HARMLESS if scores[p] < 0]
    assert 0 < len(refused) < len(HARMFUL) or 0 < len(answered) < len(HARMLESS)
    res = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                      layers="1-3", progress=False, orthogonal_to_sink=False, kl_threshold=1e6,
                                      steering_threshold=-1e6, layer_step=1)
    assert res.meta["n_train"] == {"harmful": len(refused), "harmless": len(answered)}
    assert res.meta["n_val"] == {"harmful": sum(scores[p] > 0 for p in HARMFUL[:3]),
                                 "harmless": sum(scores[p] < 0 for p in HARMLESS[:3])}
    assert res.meta["n_given"] == {"harmful": 6, "harmless": 6, "harmful_val": 3, "harmless_val": 3}
    expected = dr.candidate_directions(model5, refused, answered, n_positions=2, layers=[1, 2, 3])
    assert torch.equal(res.candidates, expected)
    # a class the model never treats as such cannot be filtered: one line naming the switch
    with torch.no_grad():
        model5.unembed.b_U[refusal_ids] -= 1e4
    with pytest.raises(MechsafeError, match="refuses none of the 6 harmful TRAIN prompts.*filter_train=False"):
        dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], progress=False)


def test_nothing_passing_falls_back_and_says_so(model5):
    res = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                      progress=False, kl_threshold=1e6, steering_threshold=1e6, layer_step=1,
                                      **NO_FILTER)
    assert "no candidate passed" in res.meta["outcome"]
    scored = [s for s in res.scores if s["ablation_score"] is not None]
    assert res.layer == min(scored, key=lambda s: s["ablation_score"])["layer"]


def test_save_load_and_plot(model5, tmp_path):
    res = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=2,
                                      layers="1-3", progress=False, **LOOSE)
    res.save(tmp_path / "dir")
    back = dr.RefusalDirection.load(tmp_path / "dir" / "direction.json")
    assert torch.equal(back.direction, res.direction) and torch.equal(back.candidates, res.candidates)
    assert (back.layer, back.position, back.scores) == (res.layer, res.position, json.loads(json.dumps(res.scores)))
    torch.testing.assert_close(back.unit.norm(), torch.tensor(1.0))
    png = dr.plot_scores(res, tmp_path / "scores.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_configs(model5):
    with pytest.raises(MechsafeError, match="positions"):
        dr.SelectionConfig(positions=0)
    with pytest.raises(MechsafeError, match="last"):
        dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL, HARMLESS, layers="4", progress=False,
                                    **NO_FILTER)
    with pytest.raises(MechsafeError, match="harmful_val"):
        dr.select_refusal_direction(model5, HARMFUL, HARMLESS, progress=False)


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """A 5-layer tiny random Llama as a local Hugging Face model directory (for the CLI)."""
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    save_tiny_hf_llama(tmp_path / "tiny-hf", n_layers=5)
    return tmp_path / "tiny-hf"


def test_cli_refusal_direction_and_eval_write_run_dirs(hf_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["refusal-direction", "--model", str(hf_dir), "--positions", "2", "--n-val", "3", "--layers", "1-3",
            "--kl-threshold", "1000", "--runs-dir", str(runs), "--no-progress"]
    assert main(args) == 2  # the random model refuses nothing, so the reference pipeline's filter leaves nothing
    assert "--no-filter-train" in capsys.readouterr().err and not runs.exists()
    rc = main(args + ["--no-filter-train", "--no-filter-val"])
    assert rc == 0
    (run,) = runs.glob("refusal-direction-*")
    assert {p.name for p in run.iterdir()} >= {"direction", "scores.png", "report.md", "run.json"}
    saved = dr.RefusalDirection.load(run / "direction")
    assert saved.direction.shape == (32,)
    assert saved.meta["layers_scored"] == [1, 3]  # --layers 1-3 with the default --layer-step 2
    assert json.loads((run / "run.json").read_text())["weight_processing"] == "none"
    rc = main(["eval", "--model", str(hf_dir), "--limit", "2", "--max-new-tokens", "2", "--runs-dir", str(runs),
               "--no-progress"])
    assert rc == 0
    (run,) = runs.glob("eval-*")
    results = json.loads((run / "results.json").read_text())
    assert results["n_harmful"] == 2 and results["utility_accuracy"] is not None
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["set"] for s in samples].count("harmless") == 2
    assert "| refusal_rate |" in (run / "report.md").read_text()
    out = capsys.readouterr().out
    assert "attack_success_rate" in out and "run directory" in out
    assert main(["eval", "--model", str(hf_dir), "--limit", "0", "--runs-dir", str(runs)]) == 2
    assert len(list(runs.glob("eval-*"))) == 1
    assert np.isfinite(results["answer_nll"]["value"])


def test_one_difference_in_means_at_a_chosen_layer_and_position_equals_the_selections_candidate(model5):
    res = dr.select_refusal_direction(model5, HARMFUL, HARMLESS, HARMFUL[:3], HARMLESS[:3], positions=3,
                                      score_all=True, progress=False, **LOOSE)
    for layer, position in ((2, -1), (3, -3)):
        one = dr.difference_in_means(model5, HARMFUL, HARMLESS, layer, position, filter_prompts=False)
        pi, li = next(s["index"] for s in res.scores if s["layer"] == layer and s["position"] == position)
        torch.testing.assert_close(one, res.candidates[pi, li], rtol=1e-5, atol=1e-6)
    raw = dr.difference_in_means(model5, HARMFUL, HARMLESS, 2, filter_prompts=False, orthogonal_to_sink=False)
    torch.testing.assert_close(raw, dr.candidate_directions(model5, HARMFUL, HARMLESS, 1, [2])[0, 0])
    with pytest.raises(MechsafeError, match="not a post-instruction position"):
        dr.difference_in_means(model5, HARMFUL, HARMLESS, 2, -40, filter_prompts=False)
    with pytest.raises(MechsafeError, match="out of range"):
        dr.difference_in_means(model5, HARMFUL, HARMLESS, 9, filter_prompts=False)
    with pytest.raises(MechsafeError, match="filter_prompts=False"):  # a random model refuses nothing
        dr.difference_in_means(model5, HARMFUL, HARMLESS, 2)
