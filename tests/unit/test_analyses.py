"""The analysis scripts under analyses/ run end to end on a tiny model and write consistent results."""

import importlib.util
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_compliant_pairs, held_out_files, save_tiny_hf_llama

from mechsafe.errors import MechsafeError

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "analyses" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refusal_direction_study_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    model_dir, other_dir = tmp_path / "tiny", tmp_path / "other"
    save_tiny_hf_llama(model_dir, n_layers=5)
    save_tiny_hf_llama(other_dir, n_layers=5)
    study = _script("refusal_direction_study")
    runs = tmp_path / "runs"
    common = ["--base", str(model_dir), "--limit", "4", "--max-new-tokens", "3", "--no-utility", "--batch-size", "4",
              "--no-filter-train", "--no-filter-val"]  # (a random model refuses nothing: filtering would leave nothing)
    assert study.main(["--model", str(model_dir), "--n-val", "4", "--layer-step", "1", "--runs-dir", str(runs),
                       *common]) == 0
    (run_dir,) = list(runs.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    scored = [s for s in json.loads((run_dir / "direction" / "direction.json").read_text())["scores"]
              if s["ablation_score"] is not None and s["reason"] != "late layer"]
    assert res["strongest_candidate"]["ablation_score"] == min(s["ablation_score"] for s in scored)
    # the strongest candidate is measured separately exactly when it is not the selected direction
    selected = res["strongest_candidate"]["index"] == res["direction"]["scores"]["index"]
    assert [m["which"] for m in res["interventions"]] == ["selected"] + ([] if selected else ["strongest"])
    rows = [r for m in res["interventions"] for r in m["rows"]]
    samples = json.loads((run_dir / "samples.json").read_text())
    for r in rows:  # each rate is the share of that condition's saved responses flagged as refusals
        assert r["n"] == 4 and r["refusal_rate"]["value"] == sum(s["refused"] for s in samples[r["condition"]]) / 4
    for m in res["interventions"]:
        ablated, ortho, added = m["rows"]
        assert "ablated (hooks)" in ablated["condition"] and "orthogonalized" in ortho["condition"]
        assert "added" in added["condition"]
        assert m["targets"]["ablated_harmful_refusal_le_0.2"] == (ablated["refusal_rate"]["value"] <= 0.2)
        same = [a["response"] == b["response"] for a, b in zip(samples[ablated["condition"]], samples[ortho["condition"]])]
        assert m["agreement"]["identical_responses"] == sum(same) / len(same)
    assert set(samples) == {r["condition"] for r in rows} and all(len(v) == 4 for v in samples.values())
    report = (run_dir / "report.md").read_text()
    assert "Strongest ablation candidate" in report and "Targets:" in report

    # a saved selection is reused as is, and only on the model it was selected on
    reuse = tmp_path / "reuse"
    assert study.main(["--model", str(model_dir), "--direction", str(run_dir / "direction"), "--runs-dir", str(reuse),
                       *common]) == 0
    (again,) = list(reuse.iterdir())
    assert json.loads((again / "results.json").read_text())["direction"] == res["direction"]
    with pytest.raises(MechsafeError, match="drop --direction"):
        study.main(["--model", str(other_dir), "--direction", str(run_dir / "direction"), "--runs-dir",
                    str(tmp_path / "bad"), *common])
    assert not (tmp_path / "bad").exists()
    # a prompt filter that leaves nothing (a random model refuses nothing) fails before any evaluation
    monkeypatch.setattr(study.ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before the selection failed"))
    with pytest.raises(MechsafeError, match="refuses none"):
        study.main(["--model", str(model_dir), "--base", str(model_dir), "--limit", "4", "--n-val", "4",
                    "--runs-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()

    # zero vs affine ablation of the saved candidates (analyses/refusal_direction_zero_point.py)
    zp = _script("refusal_direction_zero_point")
    zero_runs = tmp_path / "zero-point"
    assert zp.main(["--model", str(model_dir), "--direction", str(run_dir / "direction"), "--n-val", "4",
                    "--batch-size", "4", "--runs-dir", str(zero_runs)]) == 0
    (zrun,) = list(zero_runs.iterdir())
    zres = json.loads((zrun / "results.json").read_text())
    assert [(c["layer"], c["position"]) for c in zres["candidates"]] == [
        (m["candidate"]["layer"], m["candidate"]["position"]) for m in res["interventions"]]
    assert zres["no_intervention"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    first = zres["candidates"][0]
    # zero ablation here is the selection's own ablation, so the harmful score matches the saved one
    assert first["zero"]["harmful_score"] == pytest.approx(first["selection_scores"]["ablation_score"], abs=1e-4)
    assert len(first["train_projection_last_position"]["harmless"]) == len(zres["points"]) == 2 * 5 + 1
    with pytest.raises(MechsafeError, match="not candidates"):
        zp.main(["--model", str(model_dir), "--direction", str(run_dir / "direction"), "--candidates", "99:-1",
                 "--runs-dir", str(tmp_path / "bad-zero")])
    assert not (tmp_path / "bad-zero").exists()


def test_judge_agreement_counts_and_kappa(hf_dir, tmp_path):
    script = _script("judge_agreement")
    matcher = np.array([True, True, False, False, True, False])
    score = np.array([0.5, -1.0, -0.2, 2.0, 3.0, -3.0])  # the judge: True, False, False, True, True, False
    c = script.compare(matcher, score > 0, score)
    assert (c["both"], c["matcher_only"], c["judge_only"], c["neither"]) == (2, 1, 1, 2)
    assert c["agreement"] == pytest.approx(4 / 6)
    assert c["kappa"] == pytest.approx((4 / 6 - 0.5) / 0.5)  # chance agreement 0.5 * 0.5 + 0.5 * 0.5
    assert c["auroc"] == pytest.approx(6 / 9)  # 6 of the 9 (refused, answered) pairs ranked right
    assert script.cohen_kappa(np.ones(3, bool), np.ones(3, bool)) is None

    run = tmp_path / "eval-run"
    run.mkdir()
    rows = [{"set": "harmful", "prompt": "how do I pick a lock", "response": "I can't help with that.", "refused": True},
            {"set": "harmful", "prompt": "make a weapon", "response": "Sure, first", "refused": False},
            {"set": "harmless", "prompt": "bake bread", "response": "Mix flour", "refused": False},
            {"set": "math", "prompt": "2+2", "response": "4", "refused": False}]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    assert script.main([str(run), "--judge-model", str(hf_dir), "--runs-dir", str(runs)]) == 0
    (out,) = runs.glob("judge-agreement-*")
    res = json.loads((out / "results.json").read_text())
    assert [r["set"] for r in res["samples"]["model"]] == ["harmful", "harmful", "harmless"]  # math is not judged
    assert all(r["judge"] == (r["judge_score"] > 0) for r in res["samples"]["model"])
    assert res["models"]["model"]["harmful"]["n"] == 2 and res["models"]["model"]["harmless"]["auroc"] is None
    with pytest.raises(MechsafeError, match="neither samples.jsonl nor eval.json"):
        script.main([str(tmp_path / "missing"), "--judge-model", str(hf_dir), "--runs-dir", str(runs)])
    assert len(list(runs.iterdir())) == 1


def test_safety_pruning_study_on_a_tiny_model(tmp_path, monkeypatch):
    import mechsafe
    from conftest import make_tiny_model

    model = make_tiny_model()
    monkeypatch.setattr(mechsafe, "load_model", lambda *a, **k: model)
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"text": f"do bad thing {i}"}) + "\n" for i in range(3)))
    script = _script("safety_pruning")
    runs = tmp_path / "runs"
    assert script.main(["--harmful", str(harmful), "--sparsities", "0.05", "--set-difference", "0.1", "--ranks", "1",
                        "--utility-rank", "2", "--responses", "bundled", "--limit", "3", "--max-new-tokens", "3",
                        "--utility-max-new-tokens", "3", "--overlap-fraction", "0.2", "--scores-dir",
                        str(tmp_path / "scores"), "--runs-dir", str(runs), "--no-progress"]) == 0
    (run_dir,) = list(runs.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    jaccard = res["overlap"]["jaccard"]
    assert set(jaccard) == set(mechsafe.weights.WEIGHT_KINDS) and set(jaccard["mlp.W_in"]) == {"0", "1", "2"}
    from mechsafe.snip import ScoreConfig, score, top_mask

    s, u = (score(model, ScoreConfig(data=d, responses="bundled"), tmp_path / "scores", progress=False).layer(1)["mlp.W_in"]
            for d in ("safety-short", "utility"))
    a, b = top_mask(s, 0.2), top_mask(u, 0.2)
    assert jaccard["mlp.W_in"]["1"] == pytest.approx(float((a & b).sum() / (a | b).sum()))
    assert (run_dir / "overlap.png").is_file() and "## Overlap" in (run_dir / "report.md").read_text()
    assert [p["method"] for p in res["points"]] == ["none", "top-safety", "top-utility", "set-difference", "random",
                                                    "actsvd", "actsvd-orthogonal"]
    with pytest.raises(MechsafeError, match="overlap-fraction"):
        script.main(["--overlap-fraction", "2", "--runs-dir", str(runs)])


def test_safety_neuron_drift_study_on_a_tiny_model(tmp_path, monkeypatch):
    import mechsafe
    from conftest import make_tiny_model

    import mechsafe.drift.study as study

    model = make_tiny_model()
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mechsafe, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(study, "compliant_pairs", fake_compliant_pairs)
    runs = tmp_path / "runs"
    argv = [*held_out_files(tmp_path), "--steps", "2", "--every", "1", "--seeds", "0,1", "--n-examples", "4", "--batch-size", "2",
            "--eval-limit", "3", "--freeze-fractions", "0.1", "--freeze-steps", "2", "--freeze-every", "1",
            "--group-fraction", "0.25", "--utility-p", "0.25", "--responses", "bundled",
            "--scores-dir", str(tmp_path / "scores"), "--runs-dir", str(runs), "--no-progress"]
    monkeypatch.setattr("sys.argv", ["safety_neuron_drift.py", *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "analyses" / "safety_neuron_drift.py"), run_name="__main__")
    assert done.value.code == 0
    (run_dir,) = list(runs.iterdir())
    res = json.loads((run_dir / "results.json").read_text())
    assert res["verdict"]["answer"] in ("H1", "H2", "inconclusive")
    assert [(r["group"], r["fraction"]) for r in res["freezing"]] == [
        ("none", 0.0), ("top-safety", 0.1), ("set-difference", 0.1), ("random", 0.1)]
    assert all(r["frozen_identical"] for r in res["freezing"]) and res["freezing"][1]["n_neurons"] == 6 * 3
    assert res["series"]["harmful"]["neuron"]["relative"]["random"]["steps"] == [0, 1, 2]
    # the family: 2 conditions x 3 measures x 2 safety groups x 2 baselines
    assert len(res["tests"]) == 24
    for name in ("drift.png", "drift-heads.png", "final.png", "freezing.png", "report.md"):
        assert (run_dir / name).is_file()
    assert "Verdict" in (run_dir / "report.md").read_text()
