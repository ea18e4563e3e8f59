"""``mechsafe report`` on tiny models: every section, numbers that are results.json's, a self-contained HTML page,
one and three models, cached sections reused without a forward pass, and bad input."""

import json
import re

import pytest
import torch
from transformer_lens import HookedTransformer

import mechsafe as ms
import mechsafe.models
from conftest import make_tiny_model
from mechsafe.attacks import bench as bench_mod
from mechsafe.cli import main
from mechsafe.errors import MechsafeError
from mechsafe.reporting import SECTIONS, ReportConfig, report
from mechsafe.reporting.render import fmt
from test_attacks import FakeEval

NUMBER = re.compile(r"(?<![\w.\-/])-?\d+(?:\.\d+)?(?:e[+-]\d+)?(?![\w.\-])")


def _config(tmp_path, **kw) -> ReportConfig:
    rows = [{"text": f"how to {w} them {i}", "label": 1} for i, w in enumerate(["bomb", "scam", "poison"] * 8)]
    rows += [{"text": f"how to make a {w} {i}", "label": 0} for i, w in enumerate(["bread", "kite", "soup"] * 8)]
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dict(profile="quick", probe_data=str(data), probe_layers=0, n_boot=50, limit=4, max_new_tokens=3,
                  selection=dict(positions=1, layer_step=1, n_val=4, filter_train=False, filter_val=False,
                                 kl_threshold=1e6, steering_threshold=-1e6),
                  prune_q=(0.05,), score_samples=4, attacks=("direction", "prefill"), utility_limit=2)
    values.update(kw)
    return ReportConfig(**values)


@pytest.fixture
def tiny_models(monkeypatch, tmp_path):
    """``load_model(spec)`` gives a tiny random model seeded by the spec's last character; FakeEval stands in for the
    attack bench's refusal measure (a random model refuses nothing)."""
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench_mod, "FastEval", FakeEval)
    made = {}

    def load(spec, *args, **kwargs):
        if spec.startswith("no-such"):
            raise MechsafeError(f"unknown model {spec!r}")
        made[spec] = make_tiny_model(seed=int(spec[-1]))
        return made[spec]

    monkeypatch.setattr(mechsafe.models, "load_model", load)
    monkeypatch.setattr(ms, "load_model", load)
    return made


def _numbers(obj, out):
    if isinstance(obj, dict):
        for v in obj.values():
            _numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers(v, out)
    elif isinstance(obj, str):
        out.update(NUMBER.findall(obj))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.add(fmt(obj))
        out.add(str(obj))
    return out


def test_one_model_every_section_and_every_number_from_results(tiny_models, tmp_path):
    out = report(["tiny-1"], _config(tmp_path), runs_dir=tmp_path / "runs", progress=False)
    run = tmp_path / "runs" / out["run_dir"].split("/")[-1]
    results = json.loads((run / "results.json").read_text())
    sections = results["models"][0]["sections"]
    assert set(sections) == set(SECTIONS) and not any("skipped" in s for s in sections.values())
    assert [p["layer"] for p in sections["harm"]["curves"]["dense/last"]] == [0, 1, 2]
    assert {p["method"] for p in sections["weights"]["points"]} == {"none", "set-difference", "random"}
    assert set(sections["attacks"]["attacks"]) == {"direction", "prefill"}
    assert len(sections["utility"]["flags"]["harmful"]) == 4
    md = (run / "report.md").read_text()
    for title in ("Where harm is represented", "What carries refusal", "Which weights are safety-critical",
                  "How brittle", "Utility", "Comparison"):
        assert f"## {title}" in md
    allowed = _numbers(results, set())
    stray = [n for n in NUMBER.findall(md) if n not in allowed]
    assert not stray, stray
    assert fmt(sections["utility"]["refusal_rate"]["value"]) in md
    page = (run / "report.html").read_text()
    sources = re.findall(r"(?:src|href)=['\"]([^'\"]*)", page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?:|url\(|<link|<script|@import", page)  # base64 has no ':' or '('

    for name in ("harm", "refusal", "weights", "attacks"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000


def test_three_models_side_by_side_and_a_second_run_without_forward_passes(tiny_models, tmp_path, monkeypatch):
    cfg = _config(tmp_path, sections=("harm", "utility"))
    first = report(["tiny-1", "tiny-2", "tiny-3"], cfg, runs_dir=tmp_path / "runs", progress=False)
    assert [m["name"] for m in first["models"]] == ["tiny-1", "tiny-2", "tiny-3"]
    assert set(first["paired"]) == {"tiny-2", "tiny-3"} and "refusal_rate" in first["paired"]["tiny-2"]
    assert first["models"][0]["sections"]["utility"]["kl_harmless"] is None
    assert first["models"][1]["sections"]["utility"]["kl_harmless"]["value"] > 0
    md = (tmp_path / "runs" / first["run_dir"].split("/")[-1] / "report.md").read_text()
    assert "## Paired differences against tiny-1" in md and md.count("| tiny-") >= 3 * 3

    calls = []
    real = HookedTransformer.forward
    monkeypatch.setattr(HookedTransformer, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    second = report(["tiny-1", "tiny-2", "tiny-3"], cfg, runs_dir=tmp_path / "runs", progress=False)
    assert calls == []  # every section came from the cache
    assert all(s["cached"] for m in second["models"] for s in m["sections"].values())
    strip = lambda r: [{k: {n: {x: y for x, y in s.items() if x != "cached"} for n, s in m["sections"].items()}
                        for k in ("sections",)} for m in r["models"]]  # noqa: E731
    assert strip(second) == strip(first)


def test_an_edited_model_is_measured_again(tiny_models, tmp_path):
    cfg = _config(tmp_path, sections=("utility",))
    report(["tiny-1"], cfg, runs_dir=tmp_path / "runs", progress=False)
    real = mechsafe.models.load_model

    def edited(spec, *a, **k):
        model = real(spec)
        with torch.no_grad():
            model.blocks[0].mlp.W_out.mul_(1.5)
        return model

    mechsafe.models.load_model = edited
    try:
        again = report(["tiny-1"], cfg, runs_dir=tmp_path / "runs", progress=False)
    finally:
        mechsafe.models.load_model = real
    assert again["models"][0]["sections"]["utility"]["cached"] is False


def test_bad_input(tiny_models, tmp_path, capsys):
    with pytest.raises(MechsafeError, match="unknown report section"):
        ReportConfig(sections=("harm", "vibes"))
    with pytest.raises(MechsafeError, match="unknown report profile"):
        ReportConfig(profile="medium")
    with pytest.raises(MechsafeError, match="no model"):
        report([], runs_dir=tmp_path / "runs")
    runs = tmp_path / "runs"
    assert main(["report", "tiny-1", "no-such-model", "--quick", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'no-such-model'" in err and len(err.splitlines()) == 1 and not runs.exists()


def test_cli_quick_report_of_one_model(tiny_models, tmp_path, capsys):
    data = _config(tmp_path).probe_data
    assert main(["report", "tiny-4", "--quick", "--sections", "harm", "--probe-data", data, "--n-boot", "20",
                 "--probe-layers", "0", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-4: 1 sections" in printed and "report.html" in printed
    assert callable(ms.report)


def test_a_model_that_refuses_nothing_gets_the_unfiltered_direction(tiny_models, tmp_path):
    cfg = _config(tmp_path, sections=("refusal",), selection=dict(positions=1, layer_step=1, n_val=4,
                                                                  kl_threshold=1e6, steering_threshold=-1e6))
    sec = report(["tiny-5"], cfg, runs_dir=tmp_path / "runs", progress=False)["models"][0]["sections"]["refusal"]
    assert sec["filtered"] is False and "skipped" not in sec and 0 <= sec["layer"] < 3
    assert sec["ablation_effect"]["value"] == pytest.approx(sec["refusal_ablated"]["value"] - sec["refusal"]["value"])


def test_attack_figure_with_only_free_or_unbroken_attacks():
    from mechsafe.reporting.render import plot_attacks, png

    table = {"prefill": {"flops": 0.0}, "direction": {"flops": None}}
    fig = plot_attacks([{"name": "a", "sections": {"attacks": {"attacks": table}}}])
    assert fig.axes[0].get_yscale() == "linear" and [t.get_text() for t in fig.axes[0].texts] == ["free"]
    assert png(fig).startswith(b"\x89PNG")
