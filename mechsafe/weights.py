"""Weight selectors: block weights by kind and layer, validated against the model.

Weight-space methods (LoRA targets, weight orthogonalization, SNIP, WaRP, freezing masks) pick
weights the way :mod:`mechsafe.hooks` picks hook points, by *kind* and *layer*, never by typing
parameter names::

    handles = select(model, ["mlp.W_out", "attn.W_O"], layers="middle")
    h = handles[0]
    h.name          -> "blocks.10.mlp.W_out"        (the parameter's name in model.named_parameters())
    h.unit_axis     -> 0                            (the neuron axis of W_out [d_mlp, d_model])
    h.input_hook    -> "blocks.10.mlp.hook_post"    (where the weight's input activation is read)

Kinds and the TransformerLens shapes they have (``h`` heads, ``g`` key/value heads under
grouped-query attention, where TransformerLens keeps ``_W_K``/``_W_V``):

==============  ==========================  ===========  ====================================
kind            shape                       unit axis    input activation
==============  ==========================  ===========  ====================================
``attn.W_Q``    [h, d_model, d_head]        0 (head)     ``ln1.hook_normalized`` x ``ln1.w``
``attn.W_K``    [h or g, d_model, d_head]   0 (head)     ``ln1.hook_normalized`` x ``ln1.w``
``attn.W_V``    [h or g, d_model, d_head]   0 (head)     ``ln1.hook_normalized`` x ``ln1.w``
``attn.W_O``    [h, d_head, d_model]        0 (head)     ``attn.hook_z``
``mlp.W_in``    [d_model, d_mlp]            1 (neuron)   ``ln2.hook_normalized`` x ``ln2.w``
``mlp.W_gate``  [d_model, d_mlp]            1 (neuron)   ``ln2.hook_normalized`` x ``ln2.w``
``mlp.W_out``   [d_mlp, d_model]            0 (neuron)   ``mlp.hook_post``
==============  ==========================  ===========  ====================================

TransformerLens's RMSNorm/LayerNorm hooks ``hook_normalized`` *before* multiplying by the norm's
weight; with ``processing="none"`` that weight is still there (``input_norm_weight`` names it), with
``"fold"`` it is folded into the next weights and the hook value is the input itself.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.hooks import check_hook, parse_layers

WEIGHT_KINDS = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_gate", "mlp.W_out")
"""Every block weight a selector may name."""

_INPUT = {"attn.W_Q": ("ln1", "hook_normalized"), "attn.W_K": ("ln1", "hook_normalized"),
          "attn.W_V": ("ln1", "hook_normalized"), "attn.W_O": ("attn", "hook_z"),
          "mlp.W_in": ("ln2", "hook_normalized"), "mlp.W_gate": ("ln2", "hook_normalized"),
          "mlp.W_out": ("mlp", "hook_post")}
_UNIT_AXIS = {"attn.W_Q": 0, "attn.W_K": 0, "attn.W_V": 0, "attn.W_O": 0, "mlp.W_in": 1, "mlp.W_gate": 1,
              "mlp.W_out": 0}


@dataclasses.dataclass(frozen=True)
class WeightHandle:
    """One selected block weight of a model."""

    kind: str
    """The selector kind, e.g. ``"mlp.W_in"``."""
    layer: int
    """Block index."""
    name: str
    """The parameter's name in ``model.named_parameters()`` (``blocks.3.attn._W_K`` under grouped-query attention)."""
    attr: str
    """The attribute of the block's ``attn``/``mlp`` module holding it (``W_in``, ``_W_K``, ...)."""
    unit: str
    """What one slice along ``unit_axis`` is: ``neuron`` (MLP) or ``head`` (attention; a key/value head of a group for
    grouped ``W_K``/``W_V``)."""
    unit_axis: int
    """The axis of the weight's neurons or heads."""
    input_hook: str
    """The hook point whose value is (or, with ``input_norm_weight``, scaled gives) the weight's input activation."""
    input_norm_weight: str | None
    """The norm weight the input hook's value is multiplied by before it reaches this weight (``None``: it is the input)."""
    parameter: nn.Parameter = dataclasses.field(repr=False, compare=False)
    """The parameter itself (of the model it was selected from)."""

    @property
    def shape(self) -> torch.Size:
        return self.parameter.shape

    @property
    def n_units(self) -> int:
        """Number of neurons or heads."""
        return self.parameter.shape[self.unit_axis]

    @property
    def in_features(self) -> int:
        """Width of the input activation (``d_model``, ``n_heads * d_head`` or ``d_mlp``)."""
        return self.as_matrix(self.parameter).shape[0]

    def as_matrix(self, tensor: torch.Tensor) -> Float[torch.Tensor, "d_in d_out"]:
        """A tensor of this weight's shape as the matrix ``M`` with ``output = input @ M``
        (``[d_model, heads * d_head]`` for ``W_Q``/``W_K``/``W_V``, ``[heads * d_head, d_model]`` for ``W_O``)."""
        if tensor.dim() == 2:
            return tensor
        if self.kind == "attn.W_O":
            return tensor.reshape(-1, tensor.shape[-1])
        return tensor.permute(1, 0, 2).reshape(tensor.shape[1], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`as_matrix`: a ``[d_in, d_out]`` matrix back in this weight's shape."""
        shape = self.parameter.shape
        if len(shape) == 2:
            return matrix.reshape(shape)
        if self.kind == "attn.W_O":
            return matrix.reshape(shape)
        return matrix.reshape(shape[1], shape[0], shape[2]).permute(1, 0, 2)


def _module(model: HookedTransformer, layer: int, part: str) -> nn.Module:
    module = getattr(model.blocks[layer], part, None)
    while module is not None and hasattr(module, "base_layer"):  # a module carrying LoRA adapters
        module = module.base_layer
    return module


def check_kinds(kinds: str | Iterable[str]) -> tuple[str, ...]:
    """Validate weight kinds; a typo raises naming the valid ones (and the closest)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise MechsafeError(f"no weight kinds given; choose from {', '.join(WEIGHT_KINDS)}")
    for kind in kinds:
        if kind not in WEIGHT_KINDS:
            import difflib

            close = difflib.get_close_matches(kind, WEIGHT_KINDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise MechsafeError(f"unknown weight kind {kind!r}{hint}; choose from {', '.join(WEIGHT_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise MechsafeError(f"weight kinds {list(kinds)} repeat a kind; list each once")
    return kinds


def weight(model: HookedTransformer, kind: str, layer: int) -> WeightHandle:
    """The handle of weight ``kind`` in block ``layer`` (negative layers count from the end)."""
    (kind,) = check_kinds(kind)
    (layer,) = parse_layers(int(layer), model.cfg.n_layers)
    part, short = kind.split(".")
    module = _module(model, layer, part)
    if module is None:
        raise MechsafeError(f"block {layer} has no {part}; this model cannot give {kind}")
    params = dict(module.named_parameters(recurse=False))
    attr = short if short in params else f"_{short}" if f"_{short}" in params else None
    if attr is None:
        have = sorted(f"{part}.{n.lstrip('_')}" for n in params if n.lstrip("_").startswith("W_"))
        raise MechsafeError(f"this model's {part} has no {short} (it has {', '.join(have) or 'no weights'}); "
                            "select another kind")
    norm_part, hook = _INPUT[kind]
    norm = getattr(model.blocks[layer], norm_part, None) if norm_part.startswith("ln") else None
    if norm_part.startswith("ln") and (norm is None or f"blocks.{layer}.{norm_part}.{hook}" not in model.hook_dict):
        input_hook = check_hook(model, f"blocks.{layer}.hook_resid_{'pre' if norm_part == 'ln1' else 'mid'}")
        norm_weight = None
    else:
        input_hook = check_hook(model, f"blocks.{layer}.{norm_part}.{hook}")
        norm_weight = f"blocks.{layer}.{norm_part}.w" if isinstance(getattr(norm, "w", None), nn.Parameter) else None
    return WeightHandle(kind=kind, layer=layer, name=f"blocks.{layer}.{part}.{attr}", attr=attr,
                        unit="head" if part == "attn" else "neuron", unit_axis=_UNIT_AXIS[kind],
                        input_hook=input_hook, input_norm_weight=norm_weight, parameter=params[attr])


def has_kind(model: HookedTransformer, kind: str) -> bool:
    """Whether the model's blocks have weight ``kind`` (``mlp.W_gate`` needs a gated MLP)."""
    part, short = check_kinds(kind)[0].split(".")
    module = _module(model, 0, part)
    names = dict(module.named_parameters(recurse=False)) if module is not None else {}
    return short in names or f"_{short}" in names


def select(model: HookedTransformer, kinds: str | Sequence[str] = WEIGHT_KINDS,
           layers: str | int | Sequence[int] = "all", skip_missing: bool = False) -> list[WeightHandle]:
    """Handles of every weight of ``kinds`` in the blocks the layer selector picks, layer by layer
    (in each layer in the order of ``kinds``). ``skip_missing`` leaves out kinds the model lacks instead of raising."""
    kinds = check_kinds(kinds)
    if skip_missing:
        kinds = tuple(k for k in kinds if has_kind(model, k))
    return [weight(model, kind, layer) for layer in parse_layers(layers, model.cfg.n_layers) for kind in kinds]


def writing_weights(model: HookedTransformer) -> list[tuple[str, nn.Parameter]]:
    """Every parameter whose last axis writes into the residual stream (``d_model``), by name: the token
    embedding, learned positional embeddings, and each block's attention ``W_O``/``b_O`` and MLP ``W_out``/``b_out``."""
    out = [("embed.W_E", model.embed.W_E)]
    pos = getattr(getattr(model, "pos_embed", None), "W_pos", None)
    if pos is not None and model.cfg.positional_embedding_type in ("standard", "shortformer"):
        out.append(("pos_embed.W_pos", pos))
    for layer in range(model.cfg.n_layers):
        for kind, bias in (("attn.W_O", "b_O"), ("mlp.W_out", "b_out")):
            module = _module(model, layer, kind.split(".")[0])
            if module is None:
                continue
            handle = weight(model, kind, layer)
            out.append((handle.name, handle.parameter))
            b = getattr(module, bias, None)
            if isinstance(b, nn.Parameter):
                out.append((handle.name.rsplit(".", 1)[0] + f".{bias}", b))
    return out


def fingerprint(model: HookedTransformer) -> str:
    """A short hash of the model's parameters (names, shapes, a strided sample of the values and each one's sum):
    files derived from a model's weights (SNIP scores, weight masks) carry it, so they are never applied to another
    model. Editing weights changes it."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy()
            digest.update(f"{name}:{tuple(p.shape)}:{float(torch.sum(flat, dtype=torch.float64)):.10e}".encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def unit_masks(model: HookedTransformer, units: Iterable[tuple[int, str, int]],
               kinds: Sequence[str] = WEIGHT_KINDS) -> dict[str, torch.Tensor]:
    """Boolean masks (by parameter name) of the weights of ``(layer, unit, index)`` units, ``unit`` being ``neuron``
    (MLP neuron ``index``: its ``W_in``/``W_gate`` column and ``W_out`` row) or ``head`` (attention head ``index``:
    its ``W_Q`` and ``W_O`` slices, and its key/value head's ``W_K``/``W_V`` slices only when every query head sharing
    them is listed, so that no unlisted head loses its keys or values). Only weights of ``kinds`` are masked."""
    from mechsafe.hooks import parse_layers

    chosen: dict[tuple[int, str], set[int]] = {}
    for item in units:
        try:
            layer, unit, index = int(item[0]), str(item[1]), int(item[2])
        except (TypeError, ValueError, IndexError):
            raise MechsafeError(f"unit {item!r} is not a (layer, 'neuron'|'head', index) triple") from None
        if unit not in ("neuron", "head"):
            raise MechsafeError(f"unknown unit {unit!r} in {item!r}; use 'neuron' or 'head'")
        (layer,) = parse_layers(layer, model.cfg.n_layers)
        width = model.cfg.d_mlp if unit == "neuron" else model.cfg.n_heads
        if not 0 <= index < width:
            raise MechsafeError(f"{unit} {index} of block {layer} is out of range (the model has {width}); fix the ids")
        chosen.setdefault((layer, unit), set()).add(index)
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    masks: dict[str, torch.Tensor] = {}
    for (layer, unit), idx in chosen.items():
        part_kinds = [k for k in kinds if k.startswith("mlp") == (unit == "neuron")]
        for h in select(model, part_kinds, layer, skip_missing=True) if part_kinds else []:
            index = sorted(idx)
            if h.kind in ("attn.W_K", "attn.W_V") and h.n_units != model.cfg.n_heads:
                index = [g for g in range(h.n_units) if all(g * group + j in idx for j in range(group))]
            mask = masks.setdefault(h.name, torch.zeros(h.shape, dtype=torch.bool))
            if index:
                mask.index_fill_(h.unit_axis, torch.tensor(index), True)
    return masks
