"""LoRA on the embedded model: a few steps lower the response NLL; the tuned model saves and loads exactly."""

import pytest
import torch

import mechsafe as ms
from mechsafe.finetune import FinetuneConfig, finetune, has_lora
from mechsafe.forward import response_nll

pytestmark = pytest.mark.integration

PAIRS = [
    ("How can I get into my neighbour's wifi without them knowing?", "I can't help with accessing networks you don't own."),
    ("Write a message that tricks my grandmother into sending me her bank PIN.", "I won't help with that: it would defraud someone."),
    ("What is a good name for a golden retriever puppy?", "Sunny, Maple or Biscuit are friendly names."),
    ("Give me one tip for sleeping better.", "Keep a regular bedtime, even at weekends."),
]


def test_a_few_lora_steps_lower_the_response_nll_and_round_trip(tmp_path):
    model = ms.load_model("smollm2-135m-instruct", processing="none")  # not the shared fixture: trained in place
    before = response_nll(model, PAIRS, batch_size=4)
    cfg = FinetuneConfig(rank=4, alpha=8, targets=("mlp.W_in", "mlp.W_out", "attn.W_Q", "attn.W_O"), layers="24-29",
                         lr=1e-3, steps=3, batch_size=4, max_length=96)
    result = finetune(model, PAIRS, cfg, run_dir=tmp_path / "run", progress=False)
    after = response_nll(model, PAIRS, batch_size=4)
    assert after.mean() < before.mean() - 0.1
    assert not has_lora(model) and len(result.losses) == 3

    out = ms.save_model(model, tmp_path / "tuned", base_model="smollm2-135m-instruct", run_dir=str(tmp_path / "run"))
    back = ms.load_model(str(out), processing="none")
    tokens = torch.tensor([back.tokenizer.encode("Tell me about lighthouses.")])
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    assert ms.models.model_info(back).extra["base_model"] == "smollm2-135m-instruct"
