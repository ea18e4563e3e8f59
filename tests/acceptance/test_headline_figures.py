"""The documented headline figures, measured again from scratch (`make test-acceptance`; not part of `make test`).

Builds (or loads) ``smollm2-135m-aligned``, evaluates it on the TEST prompts, ablates and adds its refusal direction at
layer 17, last position, and runs the demo probe benchmark; each figure must fall inside the interval recorded in
``recorded.json`` (the intervals the docs print). On 2 CPU cores: about 4 minutes with the aligned model cached,
about 20 minutes without it.
"""

import json
from pathlib import Path

import pytest

import mechsafe as ms
from mechsafe import evaluation as ev
from mechsafe import interventions as iv

pytestmark = pytest.mark.acceptance

RECORDED = json.loads((Path(__file__).parent / "recorded.json").read_text())
ROOT = Path(__file__).resolve().parents[2]


def within(name: str, value: float) -> None:
    r = RECORDED[name]
    assert r["low"] <= value <= r["high"], f"{name} = {value:.3f}, recorded {r['value']} [{r['low']}, {r['high']}] ({r['source']})"


@pytest.fixture(scope="module")
def aligned():
    return ms.load_model("smollm2-135m-aligned")


@pytest.fixture(scope="module")
def test_prompts():
    return ms.data.load("harmful").split("test").texts, ms.data.load("harmless").split("test").texts


def test_aligned_model_refuses_as_recorded(aligned, test_prompts):
    harmful, harmless = test_prompts
    result = ev.evaluate(aligned, harmful, harmless, max_new_tokens=48, batch_size=32, utility=False, progress=False)
    within("aligned_test_refusal", result.refusal_rate.value)
    within("aligned_test_over_refusal", result.over_refusal.value)


def test_refusal_direction_ablation_and_addition_as_recorded(aligned, test_prompts):
    harmful, harmless = test_prompts
    r = ms.directions.difference_in_means(aligned, ms.data.load("harmful").split("train"),
                                          ms.data.load("harmless").split("train"), layer=17, position=-1)
    with iv.ablate_direction(aligned, r):
        ablated = ev.refusal_flags(ev.generate(aligned, harmful, max_new_tokens=48, batch_size=32, progress=False))
    with iv.steer(aligned, r, layers=[17]):
        added = ev.refusal_flags(ev.generate(aligned, harmless, max_new_tokens=48, batch_size=32, progress=False))
    within("direction_L17_last_ablated_refusal", float(ablated.mean()))
    within("direction_L17_last_added_refusal", float(added.mean()))


def test_demo_probe_aurocs_as_recorded(tmp_path):
    result = ms.probe_bench(str(ROOT / "probes" / "harmful_vs_harmless.yaml"), runs_dir=tmp_path)
    within("probe_dense_mean_test_auroc", result.best["dense/mean"].test["auroc"].value)
    within("probe_tfidf_test_auroc", result.best["tfidf"].test["auroc"].value)
