"""Product-key retrieval returns the exact top-k of the full N-way scores."""

import pytest
import torch

from mechsafe.errors import MechsafeError
from mechsafe.mfs.keys import ProductKeys


@pytest.mark.parametrize("n_features,k", [(1024, 8), (4096, 32), (100, 10)])
def test_product_keys_give_the_exact_top_k(n_features, k):
    keys = ProductKeys(n_features, d_in=24, d_key=8, k=k, seed=1)
    x = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(2))
    ids, scores = keys(x)
    full = keys.full_scores(x)
    want_scores, want_ids = full.topk(k, dim=-1)
    assert ids.shape == (5, 7, k)
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
    torch.testing.assert_close(full.gather(-1, ids), scores)


def test_product_keys_reject_sizes_they_cannot_index():
    with pytest.raises(MechsafeError, match="not a perfect square.*1024 or 1089"):
        ProductKeys(1030, d_in=4)
    with pytest.raises(MechsafeError, match="k=40"):
        ProductKeys(1024, d_in=4, k=40)
