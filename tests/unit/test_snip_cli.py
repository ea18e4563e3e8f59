"""``mechsafe snip score|groups`` and ``mechsafe prune-study`` through ``mechsafe.cli.main`` on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from mechsafe.cli import main
from mechsafe.runs import read_json


@pytest.fixture
def tiny(monkeypatch):
    """``load_model`` returns one tiny model whatever the spec (the CLI loads models by spec)."""
    import mechsafe
    import mechsafe.models

    model = make_tiny_model()
    monkeypatch.setattr(mechsafe.models, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(mechsafe, "load_model", lambda *a, **k: model)
    return model


def pairs_file(path, n=6):
    path.write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer number {i}"}) + "\n" for i in range(n)))
    return path


def test_snip_score_and_groups_write_runs(tiny, tmp_path, capsys):
    data = pairs_file(tmp_path / "pairs.jsonl")
    common = ["--scores-dir", str(tmp_path / "scores"), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    assert main(["snip", "score", "--data", str(data), "--prompt-column", "q", "--response-column", "a",
                 "--n-samples", "4", "--batch-size", "2", *common]) == 0
    out = capsys.readouterr().out
    safety_dir = out.split("SNIP scores (")[1].split(": ", 1)[1].split("\n")[0]
    run = next((tmp_path / "runs").iterdir())
    report = (run / "report.md").read_text()
    assert "4 of 6 pairs" in report and (run / "scores.png").is_file()
    assert read_json(run / "scores.json")["n_examples"] == 4
    assert main(["snip", "score", "--data", "utility", "--responses", "bundled", "--n-samples", "3", *common]) == 0
    utility_dir = capsys.readouterr().out.split("SNIP scores (utility): ")[1].split("\n")[0]
    assert main(["snip", "groups", "--safety-scores", safety_dir, "--utility-scores", utility_dir, "--granularity",
                 "weight", "--safety-q", "0.1", "--utility-p", "0.1", *common]) == 0
    out = capsys.readouterr().out
    assert "| set-difference |" in out
    run = max((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert {p.name for p in (run / "groups").iterdir()} == {f"{g}.{ext}" for g in
                                                            ("top-safety", "top-utility", "set-difference", "random")
                                                            for ext in ("json", "safetensors")}


def test_snip_bad_input_exits_2_with_nothing_written(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    common = ["--scores-dir", str(tmp_path / "scores"), "--runs-dir", str(runs), "--no-progress"]
    cases = [
        (["snip", "score", "--data", str(tmp_path / "missing.jsonl"), *common], "does not exist"),
        (["snip", "score", "--data", "utility", "--kinds", "mlp.W_up", *common], "unknown weight kind"),
        (["snip", "score", "--data", "utility", "--responses", "bundled", "--layers", "12", *common], "layer"),
        (["snip", "groups", "--safety-q", "1.5", *common], "not a fraction"),
        (["snip", "groups", "--safety-scores", str(tmp_path), *common], "no SNIP scores"),
        (["prune-study", "--sparsities", "0.02,2", *common], "not a fraction"),
        (["snip", "score", "--processing", "fold", *common], "--processing none"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
    assert not runs.exists() or not any(runs.iterdir())


def test_prune_study_runs_end_to_end_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    from mechsafe.snip import study

    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"text": f"do bad thing {i}"}) + "\n" for i in range(3)))
    argv = ["prune-study", "--harmful", str(harmful), "--sparsities", "0.01,0.1", "--set-difference", "0.1",
            "--ranks", "1,2", "--utility-rank", "2", "--responses", "bundled", "--limit", "3", "--max-new-tokens", "4",
            "--utility-max-new-tokens", "4", "--scores-dir", str(tmp_path / "scores"), "--runs-dir",
            str(tmp_path / "runs"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "set difference is sharper than raw SNIP" in out
    run = next((tmp_path / "runs").iterdir())
    result = read_json(run / "results.json")
    methods = [p["method"] for p in result["points"]]
    assert methods == ["none", "top-safety", "top-safety", "top-utility", "top-utility", "set-difference", "random",
                       "actsvd", "actsvd", "actsvd-orthogonal", "actsvd-orthogonal"]
    sd, rnd = methods.index("set-difference"), methods.index("random")
    assert result["points"][sd]["sparsity"] == result["points"][rnd]["sparsity"] > 0
    assert result["points"][1]["sparsity"] == pytest.approx(0.01, abs=0.002)
    assert result["n_harmful"] == 3 and (run / "pruning.png").is_file()
    report = (run / "report.md").read_text()
    assert "## Verdict" in report and report.count("| top-safety |") == 2
    base = result["points"][0]
    assert "confirmed" in base and result["verdict"]["baseline"]["refusal_rate"] == base["confirmed"]["refusal_rate"]["value"]
    confirmed = {i for c in result["verdict"]["claims"] for i in c["points"]}
    assert all(("confirmed" in p) == (i in confirmed or i == 0) for i, p in enumerate(result["points"]))
    # a rerun reuses every finished point and confirmation
    monkeypatch.setattr(study._Fast, "__call__", lambda *a, **k: pytest.fail("finished points must be reused"))
    monkeypatch.setattr(study._Fast, "confirm", lambda *a, **k: pytest.fail("confirmations must be reused"))
    assert main(argv) == 0
