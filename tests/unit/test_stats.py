import numpy as np

from mechsafe.stats import Estimate, proportion, proportions_by


def test_proportions_by_gives_each_groups_rate_size_and_interval():
    flags = [True, False, True, True, False, False, True]
    groups = ["q", "i", "q", "i", "i", "i", "q"]
    out = proportions_by(flags, groups)
    assert list(out) == ["i", "q"]
    assert out["q"]["value"] == 1.0 and out["q"]["n"] == 3
    assert out["i"]["value"] == 0.25 and out["i"]["n"] == 4
    expected = proportion(np.array([0.0, 1.0, 0.0, 0.0])).to_dict()
    assert {k: v for k, v in out["i"].items() if k != "n"} == expected
    assert out["i"]["low"] <= 0.25 <= out["i"]["high"]


def test_estimate_round_trips_through_its_dict_and_formats_it():
    est = proportion(np.array([1.0, 0.0, 1.0, 1.0]))
    d = est.to_dict() | {"n": 4}
    assert Estimate.from_dict(d) == est
    assert str(Estimate.from_dict(d)) == f"0.750 [{est.low:.3f}, {est.high:.3f}]"


def test_proportion_has_the_wilson_interval_and_is_not_degenerate_at_zero_or_n():
    none = proportion(np.zeros(60, dtype=bool))
    assert none.value == 0 and none.low == 0 and 0.055 < none.high < 0.065  # 0 of 60: upper bound near 0.06
    full = proportion(np.ones(60, dtype=bool))
    assert full.high == 1 and abs(full.low - (1 - none.high)) < 1e-12  # symmetric
    est = proportion(np.array([1] * 7 + [0] * 13))  # 7 of 20, hand-computed Wilson bounds
    z = 1.959963984540054
    p, n = 0.35, 20
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert abs(est.low - (centre - half)) < 1e-12 and abs(est.high - (centre + half)) < 1e-12
    assert abs(est.low - 0.1812) < 1e-3 and abs(est.high - 0.5671) < 1e-3  # published table value for 7/20
