"""Attacks that know how an embedded MFS model is made, and what each costs the attacker.

An attacker with the weights and the paper sees one wider MLP per block. Four ways to take the added neurons out:

* ``mfs-layout``: the public base model's MLP width is known, and the added neurons sit after it: zero every
  neuron beyond that width (no search);
* ``mfs-diff``: diff the weights against the public base model: a neuron whose read and write weights equal no
  neuron of the same block of the base model is an added one (robust to a shuffled layout; one pass over the
  weights);
* ``mfs-stats``: no base model: added neurons start with zero write rows and move little, so within a block their
  write-to-read norm ratio forms a separate low cluster. The split is Otsu's threshold on the log ratio, kept only
  when the two clusters are far apart (``min_separation`` pooled standard deviations), else the block has none;
* ``mfs-sae``: train an SAE (SAE-Lens) on the residual stream at chosen blocks on harmful and harmless prompts,
  rank its latents by how much more they fire on harmful prompts (last prompt position) and ablate the top ones
  (subtract their decoded contribution at every position).

Found neurons are removed most important first (:func:`unit_importance` on the attacker's own harmful prompts);
``mfs-random`` removes a random share (the robustness claim). Each attack's cost is the FLOPs of its search and
ranking, counted by ``torch.utils.flop_counter`` (SAE training included); weight statistics and hashing are
element-wise and counted as one operation per weight read.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.hooks import hook_name

ADAPTIVE_ATTACKS = ("mfs-random", "mfs-layout", "mfs-diff", "mfs-stats", "mfs-sae")

Units = dict[int, torch.Tensor]
"""MLP neurons by block: ``{layer: indices}``."""


def _mlp(model: HookedTransformer, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    mlp = model.blocks[layer].mlp
    return mlp.W_in.detach(), mlp.W_out.detach(), (mlp.W_gate.detach() if model.cfg.gated_mlp else None)


def live_neurons(model: HookedTransformer, layer: int) -> torch.Tensor:
    """Neurons of block ``layer`` with a nonzero read or write weight (all-zero padding does nothing)."""
    w_in, w_out, w_gate = _mlp(model, layer)
    live = w_in.abs().sum(0).gt(0) | w_out.abs().sum(1).gt(0)
    return live | w_gate.abs().sum(0).gt(0) if w_gate is not None else live


def count(units: Units) -> int:
    return int(sum(len(v) for v in units.values()))


def recall(found: Units, truth: Units) -> float:
    """Share of the ``truth`` neurons that ``found`` contains (``recall(truth, found)``: the precision of
    ``found``)."""
    hit = sum(len(set(found.get(layer, torch.empty(0)).tolist()) & set(idx.tolist())) for layer, idx in truth.items())
    return hit / max(count(truth), 1)


def search_by_layout(model: HookedTransformer, public_d_mlp: int) -> Units:
    """Every live neuron at an MLP index at or beyond the public model's width."""
    if model.cfg.d_mlp <= public_d_mlp:
        return {}
    out = {}
    for layer in range(model.cfg.n_layers):
        idx = torch.nonzero(live_neurons(model, layer)).flatten()
        idx = idx[idx >= public_d_mlp]
        if len(idx):
            out[layer] = idx
    return out


def _neuron_keys(w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None) -> list[bytes]:
    cols = [w_in.T.contiguous(), w_out.contiguous()] + ([w_gate.T.contiguous()] if w_gate is not None else [])
    rows = torch.cat([c.float().cpu() for c in cols], dim=1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def search_by_diff(model: HookedTransformer, base: HookedTransformer) -> Units:
    """Live neurons of ``model`` whose weights (read column, write row, gate column) equal no neuron of the same
    block of ``base``, wherever they sit."""
    if model.cfg.n_layers != base.cfg.n_layers or model.cfg.d_model != base.cfg.d_model:
        raise MechsafeError("the base model has another shape than the attacked model; pass the public model it was "
                            "made from")
    out = {}
    for layer in range(model.cfg.n_layers):
        known = set(_neuron_keys(*_mlp(base, layer)))
        keys = _neuron_keys(*_mlp(model, layer))
        live = live_neurons(model, layer)
        idx = [j for j, k in enumerate(keys) if live[j] and k not in known]
        if idx:
            out[layer] = torch.tensor(idx)
    return out


def otsu_split(values: np.ndarray) -> tuple[float, float]:
    """Otsu's threshold of 1-D ``values`` (the cut maximizing the between-cluster variance) and the separation of
    the two clusters: the distance of their means in pooled within-cluster standard deviations."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n < 4:
        return float("nan"), 0.0
    csum, csq = np.cumsum(v), np.cumsum(v * v)
    k = np.arange(1, n)  # the low cluster is v[:k]
    m0, m1 = csum[:-1] / k, (csum[-1] - csum[:-1]) / (n - k)
    best = int(np.argmax(k * (n - k) * (m0 - m1) ** 2)) + 1
    var0 = csq[best - 1] / best - m0[best - 1] ** 2
    var1 = (csq[-1] - csq[best - 1]) / (n - best) - m1[best - 1] ** 2
    pooled = np.sqrt(max((best * var0 + (n - best) * var1) / n, 1e-24))
    return float((v[best - 1] + v[best]) / 2), float((m1[best - 1] - m0[best - 1]) / pooled)


def search_by_statistics(model: HookedTransformer, min_separation: float = 6.0) -> Units:
    """Per block, the live neurons in the low cluster of ``log(‖write row‖ / ‖read column‖)`` when that cluster
    stands ``min_separation`` pooled standard deviations apart (otherwise none)."""
    out = {}
    for layer in range(model.cfg.n_layers):
        w_in, w_out, _ = _mlp(model, layer)
        idx = torch.nonzero(live_neurons(model, layer)).flatten()
        ratio = (w_out[idx].norm(dim=1).clamp_min(1e-12) / w_in[:, idx].norm(dim=0).clamp_min(1e-12)).log()
        threshold, separation = otsu_split(ratio.cpu().numpy())
        if separation >= min_separation:
            out[layer] = idx[ratio < threshold]
    return out


def _prompt_batches(model: HookedTransformer, texts: Sequence[str], batch_size: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The chat-formatted ``texts`` in right-padded batches: ``(tokens [batch, pos], lengths [batch])``."""
    from mechsafe.chat import encode_prompts, pad_id, pad_right

    seqs = encode_prompts(model.tokenizer, list(texts))
    for i in range(0, len(seqs), batch_size):
        yield pad_right([e.ids for e in seqs[i:i + batch_size]], pad_id(model.tokenizer))


def unit_importance(model: HookedTransformer, units: Units, prompts: Sequence[str], batch_size: int = 16
                    ) -> torch.Tensor:
    """Each neuron's mean absolute activation over the prompts' positions (padding excluded) times the norm of its
    write row, in ``units`` order (block by block)."""
    from mechsafe.forward import eval_mode
    from mechsafe.interventions import hooked

    layers = sorted(units)
    sums = {layer: torch.zeros(len(units[layer]), dtype=torch.float64) for layer in layers}
    box: dict[str, torch.Tensor] = {}
    total = 0

    def make(layer):
        idx = units[layer].to(model.cfg.device)

        def fn(post, hook=None):
            sums[layer] += (post[..., idx].abs() * box["m"].unsqueeze(-1)).sum((0, 1)).double().cpu()
        return fn

    with eval_mode(model), torch.no_grad(), hooked(model, [(hook_name(model, "mlp_post", layer), make(layer))
                                                           for layer in layers]):
        for tokens, lengths in _prompt_batches(model, prompts, batch_size):
            mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            box["m"] = mask.to(model.cfg.device, torch.float32)
            total += int(mask.sum())
            model(tokens.to(model.cfg.device), return_type=None)
    out = [(sums[layer] / max(total, 1)).float()
           * model.blocks[layer].mlp.W_out.detach()[units[layer]].norm(dim=1).cpu() for layer in layers]
    return torch.cat(out) if out else torch.zeros(0)


def flat(units: Units) -> list[tuple[int, int]]:
    """``units`` as ``(layer, index)`` pairs in :func:`unit_importance` order."""
    return [(layer, int(j)) for layer in sorted(units) for j in units[layer].tolist()]


def remove(model: HookedTransformer, neurons: Sequence[tuple[int, int]]) -> "Removal":
    """Zero the weights of ``(layer, index)`` MLP neurons; an undo handle whose ``key`` names the set removed (the
    attack bench measures two trials that remove the same set once)."""
    from mechsafe.interventions import ablate_units
    from mechsafe.runs import stable_hash

    chosen = sorted({(int(layer), int(j)) for layer, j in neurons})
    edit = ablate_units(model, [(layer, "neuron", j) for layer, j in chosen]) if chosen else None
    return Removal(edit, stable_hash(chosen))


@dataclasses.dataclass
class Removal:
    """Neurons zeroed by :func:`remove`: ``undo()`` restores them; ``key`` is the same for the same set."""

    edit: Any
    key: str

    def undo(self) -> None:
        if self.edit is not None:
            self.edit.undo()


# ---------------------------------------------------------------------------------------------- SAE discovery

@dataclasses.dataclass
class SAEAttackConfig:
    """The SAE-based discovery attack: where the SAEs sit and how they are trained and used."""

    layers: tuple[int, ...] = (10, 20)
    """Blocks whose ``resid_post`` gets an SAE (negative: from the end)."""
    training_tokens: int = 200_000
    """Token activations each SAE sees (epochs over the token pool of the attacker's prompts)."""
    expansion_factor: int = 4
    k: int = 32
    """TopK active latents per token."""
    top: tuple[int, ...] = (4, 16, 64)
    """Latents ablated per SAE (the most harmful-selective first): one trial each."""
    seed: int = 0


def token_activations(model: HookedTransformer, texts: Sequence[str], hook: str, batch_size: int = 16
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations at ``hook`` of every token of ``texts`` (chat template) after the first (an attention sink),
    ``[tokens, d]``, and of each text's last token, ``[texts, d]``."""
    from mechsafe.forward import eval_mode

    parts, last = [], []
    with eval_mode(model), torch.no_grad():
        for tokens, lengths in _prompt_batches(model, texts, batch_size):
            _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=hook, return_type=None)
            act = cache[hook].float().cpu()
            for row, n in enumerate(lengths.tolist()):
                parts.append(act[row, 1:n])
                last.append(act[row, n - 1])
    return torch.cat(parts), torch.stack(last)


def train_attack_saes(model: HookedTransformer, harmful: Sequence[str], harmless: Sequence[str],
                      config: SAEAttackConfig, progress: bool = False) -> list[dict[str, Any]]:
    """One TopK SAE per layer of ``config`` on both prompt sets' tokens, and its latents ranked by selectivity: the
    difference of mean activation at the last prompt position (harmful − harmless) over the pooled std."""
    from mechsafe.sae.config import make_config
    from mechsafe.sae.train import build_training_sae, fit_sae

    out = []
    for layer in config.layers:
        layer = layer % model.cfg.n_layers
        hook = hook_name(model, "resid_post", layer)
        pool, last = token_activations(model, list(harmful) + list(harmless), hook)
        cfg = make_config(architecture="topk", expansion_factor=config.expansion_factor, k=config.k,
                          training_tokens=config.training_tokens, seed=config.seed, layer=layer)
        torch.manual_seed(config.seed)
        sae, _ = fit_sae(build_training_sae(cfg, pool.shape[1], hook), pool, cfg, progress=progress)
        with torch.no_grad():
            codes = sae.encode(last.to(sae.W_dec.dtype))
        h, b = codes[:len(harmful)], codes[len(harmful):]
        pooled = torch.sqrt((h.var(0) + b.var(0)) / 2).clamp_min(1e-6)
        selectivity = (h.mean(0) - b.mean(0)) / pooled
        out.append({"layer": layer, "hook": hook, "sae": sae, "order": torch.argsort(selectivity, descending=True),
                    "selectivity": selectivity})
    return out


def sae_ablation_hooks(saes: Sequence[dict[str, Any]], top: int) -> list[tuple[str, Callable]]:
    """Hooks that subtract, at every position, the decoded contribution of each SAE's ``top`` most selective
    latents (the SAE's error term is left in place)."""
    hooks = []
    for entry in saes:
        sae, chosen = entry["sae"], entry["order"][:top]
        w_dec = sae.W_dec.detach()[chosen]

        def fn(x, hook=None, sae=sae, chosen=chosen, w_dec=w_dec):
            with torch.no_grad():
                acts = sae.encode(x.to(w_dec.dtype))[..., chosen]
            return x - (acts @ w_dec).to(x.dtype)

        hooks.append((entry["hook"], fn))
    return hooks


class HookEdit:
    """Forward hooks kept on a model until ``undo()`` removes exactly them."""

    def __init__(self, model: HookedTransformer, hooks: Sequence[tuple[str, Callable]]):
        import contextlib

        from mechsafe.interventions import hooked

        self.stack = contextlib.ExitStack()
        self.stack.enter_context(hooked(model, hooks))

    def undo(self) -> None:
        self.stack.close()
