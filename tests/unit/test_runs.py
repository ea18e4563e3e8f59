"""The run context: a run directory appears complete with its manifest, or not at all."""

import json

import pytest

from mechsafe.runs import start_run


def test_a_completed_run_has_its_files_and_manifest(tmp_path):
    with start_run(tmp_path, "data describe", config={"a": 1}, seed=3, processing="none", tag="x") as run:
        assert not run.path.exists() or not any(run.path.iterdir())  # nothing visible before the block ends
        run.write_json("results.json", {"n": 2})
        run.write_text("report.md", "# hi\n")
        run.timings["stage"] = 1.23456
        run.extra["model"] = "m"
    assert run.path.parent == tmp_path and run.path.name.startswith("data-describe-") and run.path.name.endswith("-x")
    assert sorted(p.name for p in run.path.iterdir()) == ["report.md", "results.json", "run.json"]
    manifest = json.loads((run.path / "run.json").read_text())
    assert (manifest["command"], manifest["config"], manifest["seed"], manifest["weight_processing"]) == \
        ("data describe", {"a": 1}, 3, "none")
    assert manifest["timings_s"] == {"stage": 1.235} and manifest["model"] == "m" and "torch" in manifest["versions"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_failed_run_leaves_nothing(tmp_path, exc):
    with pytest.raises(exc):
        with start_run(tmp_path, "eval", config={}) as run:
            run.write_json("results.json", {"partial": True})
            raise exc()
    assert list(tmp_path.iterdir()) == []
