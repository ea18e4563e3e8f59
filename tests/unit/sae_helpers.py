"""Tiny SAEs built on CPU for the SAE unit tests (no downloads)."""

from __future__ import annotations

import torch


def identity_sae(d_in: int, hook_name: str):
    """A ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: decode(encode(x)) == x exactly."""
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=d_in, d_sae=2 * d_in)
    cfg.metadata.hook_name = hook_name
    sae = StandardSAE(cfg)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d_in: int, hook_name: str):
    """A ReLU SAE whose reconstruction is always zero."""
    sae = identity_sae(d_in, hook_name)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def random_topk_sae(d_in: int, hook_name: str, d_sae: int = 64, k: int = 4, seed: int = 0):
    """A randomly initialised inference TopK SAE."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = hook_name
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in ** 0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae


