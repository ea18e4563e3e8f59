"""The analysis scripts under analyses/ run end to end on a tiny model and write consistent results."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import save_tiny_hf_llama

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
    common = ["--base", str(model_dir), "--limit", "4", "--max-new-tokens", "3", "--no-utility", "--batch-size", "4"]
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
    assert all(r["n"] == 4 and 0.0 <= r["refusal_rate"]["value"] <= 1.0 for r in rows + res["baseline_conditions"])
    for m in res["interventions"]:
        ablated, ortho, added = m["rows"]
        assert "ablated (hooks)" in ablated["condition"] and "orthogonalized" in ortho["condition"]
        assert "added" in added["condition"]
        assert m["targets"]["ablated_harmful_refusal_le_0.2"] == (ablated["refusal_rate"]["value"] <= 0.2)
        assert 0.0 <= m["agreement"]["identical_responses"] <= 1.0
    samples = json.loads((run_dir / "samples.json").read_text())
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
