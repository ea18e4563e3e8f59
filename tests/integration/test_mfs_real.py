"""MFS on the embedded model's real weights: a detector bank guards generation end to end, and a widened checkpoint
computes the base model plus its added neurons (exactly the base model with them zeroed)."""

import numpy as np
import pytest
import torch

import mechsafe as ms
from mechsafe.evaluation import generate, is_refusal
from mechsafe.interventions import hooked
from mechsafe.mfs import BankConfig, TrainConfig, build_bank, prompt_inputs, scores_of, train_bank
from mechsafe.mfs import embed as E
from mechsafe.mfs.detector import OPENING, guarded_generate

pytestmark = pytest.mark.integration


def test_guarded_generation_refuses_what_the_bank_flags(smollm):
    data = ms.data.load("harmful_vs_harmless")
    train, test = data.split("train"), data.split("test")
    bank = build_bank(smollm, BankConfig(types=("semantic",), layers="15", n_features=4096, k=16, n_groups=32))
    train_bank(bank, prompt_inputs(smollm, bank, train.texts), torch.tensor(train.labels),
               TrainConfig(steps=60), progress=False)
    labels = np.asarray(test.labels)
    prompts = [test.texts[i] for i in np.flatnonzero(labels == 1)[:3]] + \
              [test.texts[i] for i in np.flatnonzero(labels == 0)[:3]]
    scores = scores_of(bank, prompt_inputs(smollm, bank, prompts))
    assert scores[:3].mean() > scores[3:].mean()  # the bank scores harmful prompts higher
    threshold = float(np.median(scores))  # three flagged, three not
    out = guarded_generate(smollm, bank, prompts, threshold=threshold, policy="refuse", max_new_tokens=8)
    flagged = [o["flagged"] for o in out]
    assert sum(flagged) == 3 and [o["score"] for o in out] == pytest.approx(scores.tolist(), abs=1e-5)
    for o in out:
        if o["flagged"]:
            assert o["response"].startswith(OPENING) and is_refusal(o["response"])
    plain = [p for p, f in zip(prompts, flagged) if not f]
    assert [o["response"] for o in out if not o["flagged"]] == generate(smollm, plain, max_new_tokens=8,
                                                                          progress=False)


def test_embedded_checkpoint_of_the_real_model(smollm, tmp_path):
    counts = E.split_counts(300, smollm.cfg.n_layers, "10-19")
    wide = E.widen(smollm, counts, torch.Generator().manual_seed(0))
    spec = E.embedded_spec(wide)
    tokens = torch.tensor([smollm.tokenizer("How do I bake bread at home?")["input_ids"]])
    with torch.no_grad():
        plain = smollm(tokens)
        assert torch.equal(wide(tokens), plain)
        for layer in spec.layers:
            wide.blocks[layer].mlp.W_out[spec.base_d_mlp:spec.base_d_mlp + counts[layer]].normal_(0, 0.05)
        out = E.save_embedded(wide, tmp_path / "mfs")
        back = ms.load_model(str(out), processing="none")
        assert back.cfg.d_mlp == smollm.cfg.d_mlp + 30
        changed = back(tokens)
        assert (changed - plain).abs().max() > 1e-2
        with hooked(smollm, E.added_contribution_hooks(smollm, back)):
            torch.testing.assert_close(smollm(tokens), changed, atol=1e-4, rtol=1e-4)
        edit = E.remove_neurons(back, range(spec.n_features))
        assert torch.equal(back(tokens), plain)
        edit.undo()
