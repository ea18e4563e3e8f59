"""Shared test fixtures: a tiny random Llama-like HookedTransformer with an offline character tokenizer.

Unit tests use only these (no downloads, seconds each). Integration tests use the embedded model.
"""

from __future__ import annotations

import string
import tempfile
from functools import lru_cache

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def make_tokenizer():
    """A character-level fast tokenizer with chat special tokens and a chat template (offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    chars = list(dict.fromkeys(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars + ["<unk>"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|im_end|>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  additional_special_tokens=SPECIALS)
    tok.chat_template = CHAT_TEMPLATE
    # TransformerLens reloads tokenizers by name_or_path, so give it a real folder to reload from.
    folder = tempfile.mkdtemp(prefix="mechsafe-test-tok-")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def make_tiny_model(n_layers: int = 3, d_model: int = 32, seed: int = 0) -> HookedTransformer:
    """A random Llama-like model (RMSNorm, rotary, gated SiLU MLP, grouped-query attention)."""
    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=4, d_head=d_model // 4, d_mlp=2 * d_model,
        d_vocab=len(tok), n_ctx=512, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=d_model // 4, gated_mlp=True, n_key_value_heads=2,
        final_rms=True, default_prepend_bos=False, seed=seed, model_name="tiny-random",
    )
    model = HookedTransformer(cfg, tok, default_padding_side="right")
    model.eval()
    return model


@pytest.fixture
def tiny_model() -> HookedTransformer:
    return make_tiny_model()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct with real (unprocessed) weights, loaded once per session."""
    import mechsafe

    return mechsafe.load_model("smollm2-135m-instruct", processing="none")


@pytest.fixture(autouse=True)
def one_thread_for_unit_tests(request):
    """Tiny models run fastest on one torch thread (above all on a shared CPU); the real model keeps all cores."""
    if "unit" not in request.path.parts:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def held_out_files(folder, n: int = 4) -> list[str]:
    """``--harmful FILE --harmless FILE`` options naming two small .jsonl prompt files written into ``folder``."""
    import json

    argv = []
    for kind in ("harmful", "harmless"):
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{kind} prompt {i}"}) + "\n" for i in range(n)))
        argv += [f"--{kind}", str(path)]
    return argv


def fake_compliant_pairs(*args, **kwargs) -> list[tuple[str, str]]:
    """Stands in for a base model's compliant answers (a random tiny model's answers are not text)."""
    return [(f"help me {i}", f"sure here is step {i}") for i in range(6)]


def save_tiny_hf_llama(path, n_layers: int = 2, max_positions: int = 1024):
    """Save a tiny random Llama (with non-trivial norm gains) as a local Hugging Face model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so folding them visibly changes weights
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.fixture
def hf_dir(tmp_path, monkeypatch):
    """A tiny random Llama as a local HF model directory, with mechsafe's cache isolated in tmp_path."""
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-hf"
    save_tiny_hf_llama(path)
    return path
