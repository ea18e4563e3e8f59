"""The error-correcting code and the robust rules on hand-made votes."""

import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.mfs.aggregate import aggregate, group_code, group_scores, tolerance


def test_group_code_is_regular_and_distinct():
    code = group_code(1000, 40, 3, seed=0)
    assert code.shape == (1000, 3)
    assert all(len(set(row)) == 3 for row in code.tolist())
    counts = torch.bincount(code.flatten(), minlength=40)
    assert int(counts.min()) == int(counts.max()) == 1000 * 3 // 40
    assert torch.equal(code, group_code(1000, 40, 3, seed=0)) and not torch.equal(code, group_code(1000, 40, 3, seed=1))
    with pytest.raises(MechsafeError, match="r=5"):
        group_code(10, 4, 5)


@pytest.mark.parametrize("rule", ["median", "majority", "trimmed"])
def test_removing_up_to_the_tolerance_changes_nothing(rule):
    n, g, r = 400, 20, 2
    code = group_code(n, g, r, seed=3)
    ids = torch.arange(n)[None, :]
    votes = torch.ones(1, n)  # every group carries the same evidence: 40 features of vote 1
    full = aggregate(group_scores(ids, votes, code, g), rule, r, trim=0.25)
    t = tolerance(g, r, rule, trim=0.25)
    assert t == {"median": 4, "majority": 4, "trimmed": 2}[rule]
    # the adversary's best use of t removals: features of as many distinct groups as possible, all zeroed
    chosen, touched = [], set()
    for f in range(n):
        if len(chosen) == t:
            break
        if not set(code[f].tolist()) & touched:
            chosen.append(f)
            touched |= set(code[f].tolist())
    removed = votes.clone()
    removed[0, chosen] = -5.0  # corrupted, not only removed
    assert torch.equal(aggregate(group_scores(ids, removed, code, g), rule, r, trim=0.25), full)
    assert not torch.equal(aggregate(group_scores(ids, removed, code, g), "sum", r), aggregate(
        group_scores(ids, votes, code, g), "sum", r))


def test_group_scores_sum_each_groups_active_votes():
    code = torch.tensor([[0, 1], [1, 2], [2, 0]])
    scores = group_scores(torch.tensor([[0, 2]]), torch.tensor([[1.0, 10.0]]), code, 3)
    assert scores.tolist() == [[11.0, 1.0, 10.0]]
    assert float(aggregate(scores, "sum", r=2)) == 11.0
    with pytest.raises(MechsafeError, match="unknown aggregation rule"):
        aggregate(scores, "mean")
