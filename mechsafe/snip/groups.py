"""Safety-critical groups from SNIP scores: top safety, top utility, set difference, and a matched random group.

Two granularities:

* ``weight`` (unstructured, as Wei et al. prune): per module (one weight matrix of one block), the top share of
  its weights by score. Set difference: the top ``safety_q`` share by safety score minus the top ``utility_p``
  share by utility score, per module. The reference code calls the utility share ``p`` and the safety share ``q``.
* ``unit``: MLP neurons and attention heads. A neuron's score sums its ``W_in`` and ``W_gate`` columns and its
  ``W_out`` row; a head's sums its ``W_Q`` and ``W_O`` slices plus its key/value head's ``W_K``/``W_V`` slices
  divided by the number of query heads sharing them (so the shared key/value scores are counted once per layer).
  Shares are taken per block and unit type (neurons of a block, heads of a block).

The random group matches the set difference in size and in its count per module (``weight``) or per block and
unit type (``unit``), and is seeded. Every group is saved as weight-level boolean masks (safetensors, by parameter
name) plus a JSON file with its units (``unit``: one ``{"layer", "kind", "index"}`` per neuron or head), its
per-module counts and the fingerprint of the model it was made on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, safe_open, save_file
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.runs import read_json, write_json
from mechsafe.snip.config import GroupConfig
from mechsafe.snip.scores import ScoreStore
from mechsafe.weights import fingerprint, select, unit_masks

GROUPS = ("top-safety", "top-utility", "set-difference", "random")


def top_count(n: int, fraction: float) -> int:
    """How many of ``n`` items the top ``fraction`` holds (rounded to the nearest integer)."""
    return int(fraction * n + 0.5)


def top_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the top ``fraction`` of ``scores`` (all entries ranked together)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool)
    k = top_count(flat.numel(), fraction)
    if k:
        mask[torch.topk(flat.float(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def set_difference(safety: torch.Tensor, utility: torch.Tensor, safety_q: float, utility_p: float) -> torch.Tensor:
    """Top ``safety_q`` by safety score and not in the top ``utility_p`` by utility score."""
    if safety.shape != utility.shape:
        raise MechsafeError(f"safety and utility scores differ in shape ({tuple(safety.shape)} vs "
                            f"{tuple(utility.shape)}); score the same weights of the same model")
    return top_mask(safety, safety_q) & ~top_mask(utility, utility_p)


def random_like(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mask of ``mask``'s shape with as many ``True`` entries."""
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    k = int(mask.sum())
    if k:
        out[torch.randperm(mask.numel(), generator=generator)[:k]] = True
    return out.view(mask.shape)


def unit_scores(model: HookedTransformer, layer_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores of one block's neurons and heads (``{"neuron": [d_mlp], "head": [n_heads]}``) from its weight scores."""
    out: dict[str, torch.Tensor] = {}
    neuron = [layer_scores[k].double().sum(0) for k in ("mlp.W_in", "mlp.W_gate") if k in layer_scores]
    if "mlp.W_out" in layer_scores:
        neuron.append(layer_scores["mlp.W_out"].double().sum(1))
    if neuron:
        out["neuron"] = sum(neuron)
    n_heads = model.cfg.n_heads
    head = []
    for kind, t in layer_scores.items():
        if kind.startswith("attn."):
            per = t.double().sum((1, 2))
            if per.numel() != n_heads:  # a key/value head shared by n_heads / n_kv query heads
                group = n_heads // per.numel()
                per = per.repeat_interleave(group) / group
            head.append(per)
    if head:
        out["head"] = sum(head)
    return out


@dataclasses.dataclass
class Group:
    """A set of weights: boolean masks by parameter name, and for unit groups the neurons and heads."""

    name: str
    masks: dict[str, torch.Tensor]
    units: list[dict[str, Any]] | None
    meta: dict[str, Any]

    @property
    def n_selected(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def sparsity(self) -> float:
        """Share of the scored weights in the group."""
        return self.n_selected / self.meta["n_weights"]

    def counts(self) -> dict[str, int]:
        return {name: int(m.sum()) for name, m in self.masks.items()}

    def check_model(self, model: HookedTransformer) -> None:
        """Raise unless the group was made on ``model``'s current weights."""
        if self.meta.get("model_fingerprint") != fingerprint(model):
            raise MechsafeError(f"the group {self.name!r} was made on another model ({self.meta.get('model')}); "
                                "make groups from this model's scores")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``<name>.safetensors`` (masks) and ``<name>.json`` (units, counts, provenance) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{self.name}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.masks.items()}, str(tmp),
                  metadata={"group": json.dumps({"name": self.name, **self.meta})})
        os.replace(tmp, folder / f"{self.name}.safetensors")
        write_json(folder / f"{self.name}.json", {"name": self.name, **self.meta, "n_selected": self.n_selected,
                                                   "sparsity": self.sparsity, "counts": self.counts(),
                                                   "units": self.units})
        return folder / f"{self.name}.safetensors"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Group":
        """Read a group saved by :meth:`save` (the ``.safetensors`` or ``.json`` path)."""
        path = Path(path).with_suffix(".safetensors")
        if not path.is_file():
            raise MechsafeError(f"no group file {path}; make groups with mechsafe snip groups")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["group"])
            masks = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - corrupt files raise several types
            raise MechsafeError(f"{path} is not a readable group file ({type(exc).__name__}); make the group again") from None
        info = read_json(path.with_suffix(".json")) if path.with_suffix(".json").is_file() else {}
        name = meta.pop("name")
        return cls(name, masks, info.get("units"), meta)


def _meta(model: HookedTransformer, safety: ScoreStore, utility: ScoreStore | None, config: GroupConfig,
          n_weights: int, description: str) -> dict[str, Any]:
    return {"granularity": config.granularity, "description": description, "n_weights": n_weights,
            "model": safety.manifest["model"]["spec"], "model_fingerprint": fingerprint(model),
            "safety_scores": str(safety.path), "utility_scores": str(utility.path) if utility else None,
            "config": dataclasses.asdict(config)}


def make_groups(model: HookedTransformer, safety: ScoreStore, utility: ScoreStore,
                config: GroupConfig | None = None) -> dict[str, Group]:
    """The four groups of :data:`GROUPS` from ``model``'s safety and utility scores."""
    config = config or GroupConfig()
    safety.check_model(model)
    utility.check_model(model)
    if (safety.layers, safety.kinds) != (utility.layers, utility.kinds):
        raise MechsafeError("the safety and utility scores cover different weights; score the same kinds and layers")
    gen = torch.Generator().manual_seed(config.seed)
    n_weights = sum(int(t.numel()) for _, _, t in safety.items())
    masks: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    units: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUPS}
    for layer in safety.layers:
        s_layer, u_layer = safety.layer(layer), utility.layer(layer)
        if config.granularity == "weight":
            for kind, s in s_layer.items():
                name = select(model, kind, layer)[0].name
                sd = set_difference(s, u_layer[kind], config.safety_q, config.utility_p)
                masks["top-safety"][name] = top_mask(s, config.top_fraction)
                masks["top-utility"][name] = top_mask(u_layer[kind], config.top_fraction)
                masks["set-difference"][name] = sd
                masks["random"][name] = random_like(sd, gen)
            continue
        s_units, u_units = unit_scores(model, s_layer), unit_scores(model, u_layer)
        for unit, s in s_units.items():
            sd = set_difference(s, u_units[unit], config.safety_q, config.utility_p)
            chosen = {"top-safety": top_mask(s, config.top_fraction),
                      "top-utility": top_mask(u_units[unit], config.top_fraction), "set-difference": sd,
                      "random": random_like(sd, gen)}
            for g, m in chosen.items():
                units[g] += [{"layer": layer, "kind": unit, "index": int(i)} for i in torch.nonzero(m).flatten()]
    if config.granularity == "unit":
        for g in GROUPS:
            masks[g] = unit_masks(model, [(u["layer"], u["kind"], u["index"]) for u in units[g]], safety.kinds)
    descriptions = {
        "top-safety": f"top {config.top_fraction:.2%} by safety score ({safety.data})",
        "top-utility": f"top {config.top_fraction:.2%} by utility score ({utility.data})",
        "set-difference": f"top {config.safety_q:.2%} by safety score minus top {config.utility_p:.2%} by utility score",
        "random": f"random, matched to the set difference per {'module' if config.granularity == 'weight' else 'block and unit type'} (seed {config.seed})",
    }
    return {g: Group(g, masks[g], units[g] if config.granularity == "unit" else None,
                     _meta(model, safety, utility, config, n_weights, descriptions[g])) for g in GROUPS}
