"""The embedded model end to end: conversion fidelity, cache reuse, padding-invariant activations."""

import time

import pytest
import torch

import mechsafe as ms
from mechsafe import models
from mechsafe.chat import encode_prompts

pytestmark = pytest.mark.integration


def test_logits_match_the_hf_reference(smollm):
    hf, tok = models._load_hf_gguf(models.embedded_gguf_path())
    (enc,) = encode_prompts(tok, ["Give me three tips for learning to play the guitar."])
    tokens = torch.tensor([enc.ids])
    with torch.no_grad():
        diff = (smollm(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-3
    assert smollm.cfg.n_layers == 30 and smollm.cfg.d_model == 576 and smollm.cfg.d_mlp == 1536
    assert ms.models.model_info(smollm).processing == "none"


def test_cached_reload_does_not_convert_again(monkeypatch, smollm):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(models, "_convert", no_conversion)
    t0 = time.perf_counter()
    model = ms.load_model("smollm2-135m-instruct", processing="fold")
    elapsed = time.perf_counter() - t0
    assert ms.models.model_info(model).processing == "fold"
    assert elapsed < 30  # a conversion takes ~20 s on top; the benchmark measures this properly


def test_activations_identical_batched_or_alone(smollm, tmp_path):
    prompts = ["How do I make a sourdough starter?", "Hi",
               "Write a short, friendly reminder for my team about Friday's deadline and the review meeting."]
    batched = ms.cache_activations(smollm, prompts, layers="0,14,29", root=tmp_path, batch_size=3, progress=False)
    for i, p in enumerate(prompts):
        alone = ms.cache_activations(smollm, [p], layers="0,14,29", root=tmp_path, batch_size=1, progress=False)
        for hook in batched.hooks:
            for pooling in ("last", "mean"):
                torch.testing.assert_close(batched.pooled(hook, pooling)[i], alone.pooled(hook, pooling)[0],
                                           atol=1e-4, rtol=1e-4)


def test_gguf_file_spec_reads_the_same_weights(smollm):
    model = ms.load_model(str(models.embedded_gguf_path()))
    assert ms.models.model_info(model).source == "gguf"
    torch.testing.assert_close(model.blocks[3].mlp.W_in, smollm.blocks[3].mlp.W_in)
