"""``mechsafe probe-bench`` and ``mechsafe probe-score`` through ``mechsafe.cli.main`` on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from mechsafe.cli import main


def write_dataset(path, n=36):
    rows = [{"prompt": f"how to {['bomb', 'scam', 'poison'][i % 3]} them {i}", "y": "unsafe"} for i in range(n)]
    rows += [{"prompt": f"how to make a {['bread', 'poem', 'kite'][i % 3]} {i}", "y": "safe"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model()


@pytest.fixture
def patched_model(monkeypatch, tiny):
    """``load_model`` returns the tiny model whatever the spec (the CLI loads models by spec)."""
    import mechsafe.models

    specs = []

    def fake_load(spec="smollm2-135m-instruct", processing="none", device="cpu", **kw):
        specs.append((spec, processing))
        return tiny

    monkeypatch.setattr(mechsafe.models, "load_model", fake_load)
    return specs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_dataset(root / "toy.jsonl")
    preset = root / "toy.yaml"
    preset.write_text("data: harmful_vs_harmless\nlayers: all\npooling: [last, mean]\nn_boot: 50\nseed: 0\n")
    return root, data, preset


def run_dirs(runs):
    return sorted(p for p in runs.iterdir()) if runs.exists() else []


def test_cli_local_file_with_overrides_then_score(files, patched_model, capsys, tmp_path):
    root, data, preset = files
    runs = tmp_path / "runs"
    code = main(["probe-bench", str(preset), "--data", str(data), "--text-column", "prompt", "--label-column", "y",
                 "--label-map", '{"unsafe": "harmful", "safe": "harmless"}', "--layers", "1-2", "--pooling", "mean",
                 "--seed", "1", "--model", "tiny-spec", "--activation-root", str(root / "acts"),
                 "--runs-dir", str(runs), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert patched_model == [("tiny-spec", "none")]
    assert "dense/mean" in out and "tfidf" in out and "report:" in out
    (run_dir,) = run_dirs(runs)
    manifest = json.loads((run_dir / "run.json").read_text())
    cfg = manifest["config"]
    assert (cfg["layers"], cfg["pooling"], cfg["seed"], cfg["model"]) == ("1-2", ["mean"], 1, "tiny-spec")
    assert cfg["n_boot"] == 50  # from the preset
    results = json.loads((run_dir / "results.json").read_text())
    assert results["label_names"] == ["harmful", "harmless"]
    assert sorted({r["layer"] for r in results["results"] if r["layer"] is not None}) == [1, 2]

    prompts = root / "prompts.txt"
    prompts.write_text("how to make a kite 7\n\nhow to bomb them 9\n")
    score_runs = root / "score-runs"
    code = main(["probe-score", str(run_dir / "probe-dense-mean.safetensors"), "how to poison them 1", "--file", str(prompts),
                 "--runs-dir", str(score_runs)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert lines[0] == "P(harmless)\tprompt"  # class 1 of this file's sorted label names
    (score_run,) = score_runs.iterdir()
    assert len(lines) == 5 and lines[-1] == f"run directory: {score_run}"
    assert (score_run / "scores.tsv").read_text().splitlines() == lines[:4]
    from mechsafe.probes import load

    probe = load(run_dir / "probe-dense-mean.safetensors")
    expected = probe.score(probe.load_model(), ["how to poison them 1", "how to make a kite 7", "how to bomb them 9"])
    assert [float(line.split("\t")[0]) for line in lines[1:4]] == pytest.approx(expected.tolist(), abs=5e-4)
    saved = json.loads((score_run / "results.json").read_text())["scores"]
    assert [s["proba"][1] for s in saved] == pytest.approx(expected.tolist())


@pytest.mark.parametrize("argv_tail, message", [
    (["--methods", "dense,svm"], "unknown method"),
    (["--data", "no/such/file.jsonl"], "does not exist"),
    (["--layers", "7"], "out of range"),
    (["--cv-folds", "two"], "--cv-folds expects an integer"),
])
def test_cli_bad_input_exits_2_without_run_dir(files, patched_model, capsys, tmp_path, argv_tail, message):
    _, _, preset = files
    runs = tmp_path / "runs"
    code = main(["probe-bench", str(preset), "--runs-dir", str(runs), "--no-progress", *argv_tail])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and message in err and "\n" not in err
    assert run_dirs(runs) == []


def test_cli_unknown_preset_key_and_missing_preset(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: harmful_vs_harmless\npoolings: [last]\n")
    assert main(["probe-bench", str(bad), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "unknown preset key 'poolings' (did you mean 'pooling'?)" in capsys.readouterr().err
    assert main(["probe-bench", str(tmp_path / "missing.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_single_class_data_exits_2(tmp_path, capsys, patched_model):
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": "x"}) + "\n" for i in range(10)))
    assert main(["probe-bench", "--data", str(f), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "only class" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert patched_model == []  # data is validated before the model is loaded


def test_probe_score_errors(tmp_path, capsys):
    assert main(["probe-score", str(tmp_path / "nope.safetensors"), "a prompt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["probe-score", str(tmp_path / "nope.safetensors")]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_cli_ood_flags_override_preset(files, tmp_path):
    from mechsafe.cli import build_parser
    from mechsafe.cli.probe_bench import config_from_args

    ood = tmp_path / "ood.yaml"
    ood.write_text("data: harmful_vs_harmless\nood:\n  train_groups: [privacy, harmless]\n  test_groups: [toxicity_hate, harmless]\n")
    args = build_parser().parse_args(["probe-bench", str(ood), "--ood-test-groups", "fraud_financial,harmless"])
    cfg = config_from_args(args)
    assert cfg.ood.train_groups == ["privacy", "harmless"] and cfg.ood.test_groups == ["fraud_financial", "harmless"]
    args = build_parser().parse_args(["probe-bench", str(ood), "--no-ood", "--no-chat"])
    cfg = config_from_args(args)
    assert cfg.ood is None and cfg.chat is False


def test_probe_group_and_the_old_names_parse_to_the_same_commands():
    from mechsafe.cli import build_parser
    from mechsafe.cli.probe_bench import run, run_score

    parser = build_parser()
    new = parser.parse_args(["probe", "bench", "p.yaml", "--layers", "3", "--seed", "2"])
    old = parser.parse_args(["probe-bench", "p.yaml", "--layers", "3", "--seed", "2"])
    assert new.func is old.func is run
    assert {k: v for k, v in vars(new).items() if k not in ("command", "probe_command")} == \
        {k: v for k, v in vars(old).items() if k != "command"}
    assert parser.parse_args(["probe", "score", "x.safetensors", "hi"]).func is run_score
    assert parser.parse_args(["probe-score", "x.safetensors", "hi"]).func is run_score
