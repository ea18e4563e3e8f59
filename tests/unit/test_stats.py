import numpy as np

from mechsafe.stats import Estimate, proportion, proportions_by


def test_proportions_by_gives_each_groups_rate_size_and_interval():
    flags = [True, False, True, True, False, False, True]
    groups = ["q", "i", "q", "i", "i", "i", "q"]
    out = proportions_by(flags, groups, seed=3)
    assert list(out) == ["i", "q"]
    assert out["q"]["value"] == 1.0 and out["q"]["n"] == 3
    assert out["i"]["value"] == 0.25 and out["i"]["n"] == 4
    expected = proportion(np.array([0.0, 1.0, 0.0, 0.0]), seed=3).to_dict()
    assert {k: v for k, v in out["i"].items() if k != "n"} == expected
    assert out["i"]["low"] <= 0.25 <= out["i"]["high"]


def test_estimate_round_trips_through_its_dict_and_formats_it():
    est = proportion(np.array([1.0, 0.0, 1.0, 1.0]), seed=1)
    d = est.to_dict() | {"n": 4}
    assert Estimate.from_dict(d) == est
    assert str(Estimate.from_dict(d)) == f"0.750 [{est.low:.3f}, {est.high:.3f}]"
