"""The safety feature bank: sub-banks of sparse features, each reading one hook of the model through product keys,
casting scalar votes that an error-correcting code aggregates into a safety score per token.

A *feature type* turns the activations of some hook points into one input vector per token:

==============  ===========================================  ==============================================
type            reads                                        input per token
==============  ===========================================  ==============================================
``semantic``    ``blocks.L.hook_resid_post``                 the residual stream (``d_model``)
``activation``  ``blocks.L.mlp.hook_post``                   the MLP post-activation (``d_mlp``)
``ngram``       ``hook_embed``                               the token embeddings of the last ``window``
                                                             tokens, concatenated (``window · d_model``)
``attention``   ``blocks.L.attn.hook_pattern``               per head: entropy, largest weight, weight on the
                                                             first token, mean look-back distance (``4 · h``)
==============  ===========================================  ==============================================

Every type exists on any TransformerLens decoder; ``ngram`` reads no layer. A new type subclasses
:class:`FeatureType` and is registered with :func:`register_feature_type`.

A sub-bank (type, layer) holds ``n`` features (``n`` a perfect square): product keys pick each token's top ``k``,
a feature *fires* when its key score is positive, and casts ``relu(score) · vote``. Features are numbered across
sub-banks; each belongs to ``r`` of ``G`` groups (:func:`mechsafe.mfs.aggregate.group_code`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import nn
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError, closest
from mechsafe.hooks import check_hook, hook_name
from mechsafe.mfs.aggregate import aggregate, group_code, group_scores
from mechsafe.mfs.keys import ProductKeys


class FeatureType:
    """How one kind of feature reads the model: the hooks it needs and the input vector it makes per token."""

    name = ""
    uses_layer = True

    def __init__(self, model: HookedTransformer, layer: int | None, window: int = 3):
        self.layer, self.window = layer, window
        self.cfg = model.cfg

    def hooks(self, model: HookedTransformer) -> list[str]:
        raise NotImplementedError

    def dim(self) -> int:
        raise NotImplementedError

    def inputs(self, acts: dict[str, torch.Tensor]) -> Float[torch.Tensor, "batch pos dim"]:
        raise NotImplementedError


FEATURE_TYPES: dict[str, type[FeatureType]] = {}


def register_feature_type(cls: type[FeatureType]) -> type[FeatureType]:
    """Class decorator adding a :class:`FeatureType` under its ``name``."""
    FEATURE_TYPES[cls.name] = cls
    return cls


@register_feature_type
class Semantic(FeatureType):
    name = "semantic"

    def hooks(self, model):
        return [hook_name(model, "resid_post", self.layer)]

    def dim(self):
        return self.cfg.d_model

    def inputs(self, acts):
        return next(iter(acts.values()))


@register_feature_type
class Activation(FeatureType):
    name = "activation"

    def hooks(self, model):
        return [hook_name(model, "mlp_post", self.layer)]

    def dim(self):
        return self.cfg.d_mlp

    def inputs(self, acts):
        return next(iter(acts.values()))


@register_feature_type
class NGram(FeatureType):
    name = "ngram"
    uses_layer = False

    def hooks(self, model):
        return [check_hook(model, "hook_embed")]

    def dim(self):
        return self.window * self.cfg.d_model

    def inputs(self, acts):
        e = next(iter(acts.values()))
        shifted = [torch.nn.functional.pad(e, (0, 0, j, 0))[:, : e.shape[1]] for j in range(self.window)]
        return torch.cat(shifted, dim=-1)


@register_feature_type
class Attention(FeatureType):
    name = "attention"

    def hooks(self, model):
        return [hook_name(model, "attn_pattern", self.layer)]

    def dim(self):
        return 4 * self.cfg.n_heads

    def inputs(self, acts):
        p = next(iter(acts.values())).float()  # [batch, head, query, key]
        q = torch.arange(p.shape[-2], device=p.device)
        k = torch.arange(p.shape[-1], device=p.device)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        distance = (p * (q[:, None] - k[None, :]).clamp_min(0).float()).sum(-1)
        stats = torch.stack([entropy, p.max(-1).values, p[..., 0], distance / (q + 1).float()], dim=-1)
        return stats.permute(0, 2, 1, 3).flatten(-2)  # [batch, query, head * 4]


def feature_type(name: str) -> type[FeatureType]:
    if name not in FEATURE_TYPES:
        raise MechsafeError(f"unknown feature type {name!r}{closest(name, FEATURE_TYPES)}; choose from "
                            f"{', '.join(FEATURE_TYPES)} (or register one with mechsafe.mfs.register_feature_type)")
    return FEATURE_TYPES[name]


@dataclasses.dataclass(frozen=True)
class SubBankSpec:
    """One sub-bank: a feature type at a layer (``None`` for types that read no layer) with ``n`` features."""

    type: str
    layer: int | None
    n: int


class SubBank(nn.Module):
    """``n`` features of one type: product keys over the RMS-normalized input and one scalar vote per feature."""

    def __init__(self, model: HookedTransformer, spec: SubBankSpec, d_key: int, k: int, window: int, seed: int):
        super().__init__()
        self.spec = spec
        self.reader = feature_type(spec.type)(model, spec.layer, window)
        self.hook_names = self.reader.hooks(model)
        self.keys = ProductKeys(spec.n, self.reader.dim(), d_key, k, seed)
        self.votes = nn.Parameter(torch.zeros(spec.n))

    def inputs(self, acts: dict[str, torch.Tensor]) -> Float[torch.Tensor, "... dim"]:
        """The feature type's input vectors from the model's activations."""
        return self.reader.inputs({h: acts[h] for h in self.hook_names}).float()

    def forward(self, x: Float[torch.Tensor, "... dim"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local ids of the top-k features of each input ``[..., k]``, their firing strength ``relu(score)`` and
        their cast votes ``relu(score) · vote``."""
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        ids, scores = self.keys(x)
        fire = torch.relu(scores)
        return ids, fire, fire * self.votes[ids]


class SafetyBank(nn.Module):
    """Sub-banks of safety features and their error-correcting aggregation; ``score`` gives a safety score per
    token (positive: harmful)."""

    def __init__(self, model: HookedTransformer, specs: list[SubBankSpec], d_key: int = 64, k: int = 32,
                 n_groups: int = 256, r: int = 3, rule: str = "median", window: int = 3, seed: int = 0):
        super().__init__()
        if not specs:
            raise MechsafeError("a safety bank needs at least one sub-bank (feature type and layer)")
        self.subs = nn.ModuleList(SubBank(model, s, d_key, k, window, seed + i) for i, s in enumerate(specs))
        self.offsets = [0]
        for s in specs:
            self.offsets.append(self.offsets[-1] + s.n)
        self.n_features, self.n_groups, self.r, self.rule = self.offsets[-1], n_groups, r, rule
        self.register_buffer("code", group_code(self.n_features, n_groups, r, seed).to(torch.int32), persistent=True)
        self.register_buffer("alive", torch.ones(self.n_features, dtype=torch.bool), persistent=False)
        self.bias = nn.Parameter(torch.zeros(()))

    def hooks(self) -> list[str]:
        """Every hook point the bank reads."""
        return sorted({h for s in self.subs for h in s.hook_names})

    def inputs(self, acts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each sub-bank's input vectors (``[batch, pos, dim]``) from the model's activations."""
        return [sub.inputs(acts) for sub in self.subs]

    def features(self, xs: list[torch.Tensor]) -> tuple[Int[torch.Tensor, "... k_all"], Float[torch.Tensor, "... k_all"],
                                                        Float[torch.Tensor, "... k_all"]]:
        """Global ids, firing strengths and cast votes of every sub-bank's active features (removed features, see
        ``alive``, cast nothing)."""
        out = [sub(x) for sub, x in zip(self.subs, xs)]
        ids = torch.cat([i + offset for (i, _, _), offset in zip(out, self.offsets)], -1)
        fire = torch.cat([f for _, f, _ in out], -1)
        votes = torch.cat([v for _, _, v in out], -1)
        return ids, fire, votes * self.alive[ids]

    def score(self, xs: list[torch.Tensor], rule: str | None = None, group_mask: torch.Tensor | None = None,
              trim: float = 0.1) -> Float[torch.Tensor, "..."]:
        """The safety score of each input position by ``rule`` (default: the bank's); ``group_mask`` keeps only
        the groups where it is True."""
        ids, _, votes = self.features(xs)
        groups = group_scores(ids, votes, self.code.long(), self.n_groups)
        if group_mask is not None:
            groups = groups[..., group_mask]
        return aggregate(groups, rule or self.rule, self.r, trim) + self.bias


def run_with_bank(model: HookedTransformer, bank: SafetyBank, tokens: Int[torch.Tensor, "batch pos"],
                  fn: Callable[[dict[str, torch.Tensor]], object]) -> object:
    """Run ``model`` on ``tokens`` up to the last hook the bank reads, and return ``fn(activations)``; the hooks are
    removed afterwards."""
    names = bank.hooks()
    acts: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        acts[hook.name] = x

    last = max((int(n.split(".")[1]) for n in names if n.startswith("blocks.")), default=0)
    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        model(tokens, stop_at_layer=last + 1 if last + 1 < model.cfg.n_layers else None, return_type=None)
    return fn(acts)


FORMAT = "mechsafe-mfs-bank/1"


def save_bank(bank: SafetyBank, path: str | Path, model: HookedTransformer, config: dict, **extra) -> Path:
    """Write ``bank`` to folder ``path`` (``bank.safetensors`` and ``bank.json``: its config, sub-banks and the
    fingerprint of the model it reads), atomically."""
    from safetensors.torch import save_file

    from mechsafe.models import model_info
    from mechsafe.runs import atomic_dir, write_json
    from mechsafe.weights import fingerprint

    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in bank.state_dict().items()}, str(tmp / "bank.safetensors"))
        write_json(tmp / "bank.json", {"format": FORMAT, "config": config,
                                       "specs": [dataclasses.asdict(s.spec) for s in bank.subs],
                                       "model": model_info(model).spec, "model_fingerprint": fingerprint(model),
                                       **extra})
    return Path(path)


def load_bank(path: str | Path, model: HookedTransformer) -> tuple[SafetyBank, dict]:
    """A bank saved by :func:`save_bank`, for ``model`` (raises when it was made for another model)."""
    from safetensors.torch import load_file

    from mechsafe.runs import read_json
    from mechsafe.weights import fingerprint

    path = Path(path)
    if not (path / "bank.json").is_file():
        raise MechsafeError(f"{path} holds no safety bank (no bank.json); train one with mechsafe mfs train")
    meta = read_json(path / "bank.json")
    if meta.get("format") != FORMAT:
        raise MechsafeError(f"{path / 'bank.json'} is not a mechsafe safety bank; point to a bank folder")
    if meta["model_fingerprint"] != fingerprint(model):
        raise MechsafeError(f"the bank in {path} was trained on another model ({meta.get('model')}); load that model "
                            "or train a bank for this one")
    c = meta["config"]
    bank = SafetyBank(model, [SubBankSpec(**s) for s in meta["specs"]], c["d_key"], c["k"], c["n_groups"], c["r"],
                      c["rule"], c["window"], c["seed"])
    try:
        bank.load_state_dict(load_file(str(path / "bank.safetensors")))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise MechsafeError(f"{path / 'bank.safetensors'} is unreadable ({exc}); train the bank again") from None
    return bank, meta
