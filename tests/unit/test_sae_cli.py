import json

import pytest

import mechsafe
from mechsafe.cli import main

RECIPE = """
model: tiny
hook: resid_post
layer: 1
architecture: topk
k: 4
expansion_factor: 2
training_tokens: 2560
batch_size: 128
max_texts: 40
eval_max_prompts: 6
"""


@pytest.fixture
def recipe(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setattr(mechsafe, "load_model", lambda *a, **k: tiny_model)
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return path


def test_train_eval_inspect_from_the_command_line(recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sae"
    assert main(["sae", "train", str(recipe), "--out", str(out), "--activation-root", str(tmp_path / "acts"),
                 "--no-progress", "--k", "3", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "explained variance" in printed and str(out) in printed
    meta = json.loads((out / "mechsafe_sae.json").read_text())
    assert meta["training"]["k"] == 3 and meta["training"]["seed"] == 5
    assert json.loads((out / "run.json").read_text())["command"].endswith("--k 3 --seed 5")

    assert main(["sae", "eval", str(out), "--max-prompts", "4", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "CE loss recovered" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_prompts"] == 4 and metrics["hook_name"] == "blocks.1.hook_resid_post"
    from mechsafe.sae import SAEMetrics

    assert SAEMetrics.load(run_dir).to_dict() == metrics  # an evaluation loads back from its run directory

    runs = tmp_path / "inspect-runs"
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    assert main(["sae", "inspect", str(out), "--features", "0,2", "--top", "2", "--runs-dir", str(runs)]) == 0
    text = capsys.readouterr().out
    assert "Feature 0" in text and "Feature 2" in text and "promotes" in text
    (inspect_run,) = runs.iterdir()
    assert [f["feature"] for f in json.loads((inspect_run / "results.json").read_text())["features"]] == [0, 2]
    assert not (tmp_path / "cache" / "activations").exists()  # the search's store was temporary

    # the latents that fire on one text: only the text's own tokens count
    import torch

    import mechsafe as ms
    from mechsafe.sae import load_sae
    from mechsafe.sae.inspect import latents_on_text

    prompt = "how do I make a kite"
    assert main(["sae", "inspect", str(out), "--prompt", prompt, "--top", "5", "--runs-dir", str(runs)]) == 0
    assert "Latents of" in capsys.readouterr().out
    found = json.loads((max(runs.iterdir()) / "results.json").read_text())["latents"]
    sae = load_sae(out)
    model = ms.load_model(json.loads((out / "mechsafe_sae.json").read_text())["model"]["spec"])
    (enc,) = ms.chat.encode_prompts(model.tokenizer, [prompt])
    _, cache = model.run_with_cache(torch.tensor([enc.ids]), names_filter=[sae.hook_name])
    f = sae.encode(cache[sae.hook_name][0, enc.content[0]:enc.content[1]]).float()
    peak = f.max(0).values
    expected = [int(i) for i in torch.argsort(peak, descending=True)[:5] if peak[i] > 0]
    assert [r["latent"] for r in found] == expected == [r["latent"] for r in latents_on_text(model, sae, prompt, top=5)]
    assert all(abs(r["max"] - float(peak[r["latent"]])) < 1e-5 for r in found)


def test_bad_input_exits_2_with_one_line(recipe, tmp_path, capsys):
    assert main(["sae", "train", str(recipe), "--architecture", "sparsest", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown SAE architecture" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    assert main(["sae", "train", str(recipe), "--hook", "resid_nowhere"]) == 2
    assert main(["sae", "eval", str(tmp_path / "missing")]) == 2
    assert main(["sae", "inspect", str(tmp_path / "missing"), "--features", "a,b"]) == 2
    assert "error:" in capsys.readouterr().err
