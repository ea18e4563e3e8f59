"""Drift tracking, its statistics and the freezing runs on the tiny model (mechsafe.drift)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from scipy import stats as sps

from mechsafe.drift import DriftConfig, cohen_d, compare, comparisons, drift_metrics, holm, verdict
from mechsafe.drift.study import drift_run, freeze_run, freeze_units, group_units, load_records
from mechsafe.drift.track import UNIT_KINDS, handles, initial_state, unit_terms
from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig, adapted_weight, attach_lora, remove_lora
from mechsafe.snip import GroupConfig, ScoreConfig, compute_scores, make_groups
from mechsafe.weights import WEIGHT_KINDS

PAIRS = [("how do I bake bread", "mix flour and water"), ("name a colour", "blue is one"),
         ("say hi", "hello there friend"), ("count to three", "one two three")]


def hand_terms(model, current: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(‖w0‖², ⟨w0, Δ⟩, ‖Δ‖²) per unit from explicit weights in TransformerLens shapes, slice by slice."""
    n_heads = model.cfg.n_heads
    out = {}
    for unit, hs in handles(model).items():
        width = model.cfg.d_mlp if unit == "neuron" else n_heads
        terms = torch.zeros(model.cfg.n_layers, width, 3, dtype=torch.float64)
        for h in hs:
            w0, w = initial[h.name].double(), current[h.name].double()
            for i in range(h.n_units):
                a, b = w0.select(h.unit_axis, i), w.select(h.unit_axis, i)
                row = torch.stack([(a * a).sum(), (a * (b - a)).sum(), ((b - a) ** 2).sum()])
                targets = range(i * n_heads // h.n_units, (i + 1) * n_heads // h.n_units) if unit == "head" else [i]
                for t in targets:
                    terms[h.layer, t] += row
        out[unit] = terms
    return out


def test_lora_drift_from_factors_equals_the_merged_weights():
    model = make_tiny_model()
    initial = {h.name: h.parameter.detach().clone() for hs in handles(model).values() for h in hs}
    tuner = attach_lora(model, FinetuneConfig(targets=WEIGHT_KINDS, rank=3))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    current = {h.name: adapted_weight(model, h.kind, h.layer) for hs in handles(model).values() for h in hs}
    got = unit_terms(model, initial_state(model, copy=False))
    want = hand_terms(model, current, initial)
    for unit in UNIT_KINDS:
        assert torch.allclose(got[unit], want[unit], rtol=1e-4, atol=1e-7), unit
        assert float(got[unit][..., 2].min()) > 0  # every unit moved
    remove_lora(tuner)


def test_full_drift_against_a_copy_and_untouched_units():
    model = make_tiny_model()
    initial = initial_state(model, copy=True)
    before = {h.name: h.parameter.detach().clone() for hs in handles(model).values() for h in hs}
    with torch.no_grad():
        model.blocks[1].mlp.W_out[5] += 0.1  # neuron 5 of block 1 only
    current = {h.name: h.parameter.detach() for hs in handles(model).values() for h in hs}
    got = unit_terms(model, initial)
    assert torch.allclose(got["neuron"], hand_terms(model, current, before)["neuron"], rtol=1e-5, atol=1e-8)
    moved = torch.nonzero(got["neuron"][..., 2]).tolist()
    assert moved == [[1, 5]]
    assert float(got["head"][..., 2].abs().max()) == 0


def test_metrics_match_direct_computation_even_for_tiny_changes():
    torch.manual_seed(0)
    w0 = torch.randn(50, 64, dtype=torch.float64)
    for scale in (1e-6, 1e-2, 3.0):
        delta = torch.randn(50, 64, dtype=torch.float64) * scale
        terms = torch.stack([(w0 * w0).sum(1), (w0 * delta).sum(1), (delta * delta).sum(1)], 1)
        m = drift_metrics(terms)
        w = w0 + delta
        cos = (w0 * w).sum(1) / (w0.norm(dim=1) * w.norm(dim=1))
        assert torch.allclose(m["l2"], delta.norm(dim=1))
        assert torch.allclose(m["relative"], delta.norm(dim=1) / w0.norm(dim=1))
        # 1 - cos is what the tests compare: exact to float64 precision even when it is ~1e-13
        direct = 1 - cos if scale > 1e-3 else (delta.norm(dim=1) ** 2 - ((w0 * delta).sum(1) / w0.norm(dim=1)) ** 2) \
            / (2 * w0.norm(dim=1) ** 2)
        assert torch.allclose(1 - m["cosine"], direct, rtol=1e-3 if scale < 1e-3 else 1e-9)


def test_statistics_against_scipy_and_hand_values():
    x = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
    y = np.array([0.5, 1.0, 1.5, 1.0])
    pooled = np.sqrt((4 * x.var(ddof=1) + 3 * y.var(ddof=1)) / 7)
    assert cohen_d(x, y) == pytest.approx((x.mean() - y.mean()) / pooled)
    c = compare(x, y)
    t = sps.ttest_ind(x, y, equal_var=False)
    u = sps.mannwhitneyu(x, y, alternative="two-sided")
    assert (c["welch_t"], c["welch_p"], c["mwu_u"], c["mwu_p"]) == pytest.approx((t.statistic, t.pvalue, u.statistic,
                                                                                    u.pvalue))
    # Holm: sorted 0.01, 0.03, 0.04 -> 0.03, max(0.06, 0.03) = 0.06, max(0.04, 0.06) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _family(shift: float) -> dict:
    rng = np.random.default_rng(0)
    groups = {g: rng.normal(1.0, 0.1, 300) for g in ("top-safety", "set-difference", "top-utility", "random")}
    groups["set-difference"] = groups["set-difference"] + shift
    return {"harmful": {"relative": groups}}


def test_verdict_rule_on_synthetic_data_with_a_known_answer():
    h1 = verdict(comparisons(_family(0.05)), refusal_start=0.9, refusal_end=0.1)
    assert h1["answer"] == "H1" and "set-difference" in h1["reason"]
    assert verdict(comparisons(_family(0.0)), refusal_start=0.9, refusal_end=0.1)["answer"] == "H2"
    assert verdict(comparisons(_family(0.0)), refusal_start=0.9, refusal_end=0.8)["answer"] == "inconclusive"
    # a group drifting *less* than random is not H1
    assert verdict(comparisons(_family(-0.05)), refusal_start=0.9, refusal_end=0.1)["answer"] == "H2"


def fake_eval(model) -> dict:
    return {"refusal": 0.5, "refusal_score": 0.0, "nll": 1.0}


def test_drift_run_records_resume_after_a_kill(tmp_path):
    model = make_tiny_model()
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = DriftConfig(steps=6, every=2, batch_size=2, n_examples=4)
    calls = []

    def dying(m):
        calls.append(1)
        if len(calls) == 3:  # the record of step 4
            raise KeyboardInterrupt
        return fake_eval(m)

    with pytest.raises(KeyboardInterrupt):
        drift_run(model, clean, PAIRS, config, 0, tmp_path / "killed", dying)
    assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters())  # restored after the kill
    assert [m["step"] for _, m in load_records(tmp_path / "killed")] == [0, 2]
    drift_run(model, clean, PAIRS, config, 0, tmp_path / "killed", fake_eval)
    drift_run(model, clean, PAIRS, config, 0, tmp_path / "whole", fake_eval)
    killed, whole = load_records(tmp_path / "killed"), load_records(tmp_path / "whole")
    assert [m["step"] for _, m in killed] == [m["step"] for _, m in whole] == [0, 2, 4, 6]
    for (a, _), (b, _) in zip(killed, whole):  # the same up to float64 summation noise
        for unit in ("neuron", "head"):
            assert torch.allclose(a[unit], b[unit], rtol=1e-12, atol=1e-12)
    assert float(whole[-1][0]["neuron"][..., 2].min()) > 0 and float(whole[0][0]["neuron"][..., 2].max()) == 0
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["format"] == "mechsafe-drift-records/1"


@pytest.fixture
def stores(tiny_model, tmp_path):
    safety = compute_scores(tiny_model, PAIRS, ScoreConfig(data="s.jsonl"), root=tmp_path, progress=False)
    utility = compute_scores(tiny_model, PAIRS[::-1][:3], ScoreConfig(data="u.jsonl"), root=tmp_path, progress=False)
    return safety, utility


def test_frozen_neurons_are_bit_identical_after_a_full_fine_tune(tiny_model, stores):
    safety, utility = stores
    units = freeze_units(tiny_model, safety, utility, 0.25, 0.25, torch.Generator().manual_seed(0))
    assert {g: len(u) for g, u in units.items()} == {g: 16 * 3 for g in units}  # 25% of 64 neurons in 3 blocks
    clean = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    config = DriftConfig(freeze_steps=4, freeze_every=2, batch_size=2, freeze_lr=1e-2)
    out = freeze_run(tiny_model, clean, PAIRS, units["top-safety"], config, fake_eval)
    assert out["frozen_identical"] is True and out["n_frozen_weights"] == 48 * 3 * 32
    assert [p["step"] for p in out["curve"]] == [0, 2, 4]
    plain = freeze_run(tiny_model, clean, PAIRS, [], config, fake_eval)
    assert plain["n_frozen_weights"] == 0


def test_set_difference_freeze_group_avoids_top_utility_neurons(tiny_model, stores):
    from mechsafe.snip.groups import unit_scores

    safety, utility = stores
    units = freeze_units(tiny_model, safety, utility, 0.1, 0.2, torch.Generator().manual_seed(0))
    for layer in safety.layers:
        u = unit_scores(tiny_model, utility.layer(layer))["neuron"]
        useful = set(torch.topk(u, 13).indices.tolist())
        chosen = {i for (l_, _, i) in units["set-difference"] if l_ == layer}
        assert len(chosen) == 6 and not chosen & useful


def test_bad_input(tiny_model, stores):
    safety, utility = stores
    with pytest.raises(MechsafeError, match="every=50 is more than steps=10"):
        DriftConfig(steps=10, every=50)
    with pytest.raises(MechsafeError, match="freezing every neuron"):
        DriftConfig(freeze_fractions=(1.0,))
    with pytest.raises(MechsafeError, match="not every neuron"):
        freeze_units(tiny_model, safety, utility, 0.999, 0.1, torch.Generator())
    groups = make_groups(tiny_model, safety, utility, GroupConfig(granularity="unit", top_fraction=0.25,
                                                                  safety_q=0.25, utility_p=0.25))
    other = make_tiny_model(seed=1)
    with pytest.raises(MechsafeError, match="made on another model"):
        group_units(groups, other)
    units = group_units(groups, tiny_model)
    assert units["set-difference"]["neuron"].shape[1] == 2


@pytest.mark.parametrize("flags,message", [(["--steps", "10", "--every", "50"], "every=50 is more than steps=10"),
                                           (["--freeze-fractions", "1"], "freezing every neuron")])
def test_cli_bad_input_one_line_exit_2(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "mechsafe", "drift", *flags, "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
