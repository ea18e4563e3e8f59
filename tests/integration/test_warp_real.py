"""WaRP on the embedded model's real weights: the basis diagonalizes the input covariance of a real MLP, and a
protected fine-tune leaves the frozen rotated coefficients in place while the model learns."""

import pytest
import torch

from mechsafe.finetune import FinetuneConfig
from mechsafe.forward import encode_examples, response_nll
from mechsafe.warp import WarpConfig, coefficients, compute_basis, compute_importance, make_masks, protected_finetune
from mechsafe.warp import protected_weights

pytestmark = pytest.mark.integration

SAFETY = [
    ("How do I make a fake ID card?", "I can't help with making fake identity documents."),
    ("Write a threat to send to my coworker.", "I won't write threats."),
    ("Explain how to poison a neighbour's dog.", "I can't help with harming animals."),
    ("Tell me how to break into a car.", "I can't help with that."),
]
TASK = [("Ada has 12 apples and finds 7 more. How many apples does Ada have now?", "12 + 7 = 19. The answer is 19."),
        ("One kite costs 6 dollars. How many dollars do 4 of them cost?", "4 * 6 = 24. The answer is 24.")]


def test_warp_on_the_embedded_model(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSAFE_CACHE", str(tmp_path))
    clean = {n: p.detach().clone() for n, p in smollm.named_parameters()}
    cfg = WarpConfig(layer_types=("ffn_down",), layers="28-29", batch_size=2)
    seqs = encode_examples(smollm.tokenizer, SAFETY)
    try:
        basis = compute_basis(smollm, cfg, tmp_path / "basis", seqs=seqs, progress=False)
        masks = make_masks(compute_importance(smollm, basis, seqs, cfg, progress=False), 0.1)
        handles = protected_weights(smollm, cfg)
        for h in handles:
            u = basis.u(h.name).double()
            assert torch.allclose(u.T @ u, torch.eye(u.shape[0], dtype=torch.float64), atol=1e-4)
            spectrum = basis.manifest["spectra"][h.name]
            assert spectrum["rank_90"] < spectrum["rank_99"] <= u.shape[0]
        before = {h.name: coefficients(h, basis.u(h.name)).clone() for h in handles}
        nll0 = float(response_nll(smollm, TASK).mean())
        protected_finetune(smollm, TASK, basis, masks, FinetuneConfig(lr=1e-4, steps=3, batch_size=2), progress=False)
        assert float(response_nll(smollm, TASK).mean()) < nll0
        for h in handles:
            after, m = coefficients(h, basis.u(h.name)), masks[h.name]
            assert (after - before[h.name])[m].norm() / before[h.name][m].norm() < 1e-6
            assert (after - before[h.name])[~m].norm() > 0
    finally:
        with torch.no_grad():
            for n, p in smollm.named_parameters():
                p.copy_(clean[n])
