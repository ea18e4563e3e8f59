"""Hook-name builders and layer selectors, validated against the model.

Hook points are chosen by *kind* and *layer* rather than typed by hand::

    hook_name(model, "resid_post", 12)        -> "blocks.12.hook_resid_post"
    parse_layers("middle", model.cfg.n_layers) -> [10, 11, ..., 19]   (for 30 layers)

A kind, layer or hook that the model does not have raises a one-line error naming the valid choices.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError

HOOK_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{layer}.mlp.hook_pre_linear",
    "attn_q": "blocks.{layer}.attn.hook_q",
    "attn_k": "blocks.{layer}.attn.hook_k",
    "attn_v": "blocks.{layer}.attn.hook_v",
    "attn_z": "blocks.{layer}.attn.hook_z",
    "attn_pattern": "blocks.{layer}.attn.hook_pattern",
}
"""Hook kinds and the TransformerLens hook-name template of each (``{layer}`` is filled in)."""

NAMED_LAYER_SETS = ("all", "early", "middle", "late", "last")


def parse_layers(selector: str | int | Iterable[int], n_layers: int) -> list[int]:
    """Resolve a layer selector to a sorted list of layer indices.

    Selectors: ``all``; ``early`` / ``middle`` / ``late`` (the first, second and last third);
    ``last``; a range ``3-7`` (inclusive); a list ``0,5,9``; an int (negative counts from the end);
    or an iterable of ints.
    """
    if n_layers < 1:
        raise MechsafeError(f"the model has {n_layers} layers; a model needs at least one")
    if isinstance(selector, bool):
        raise MechsafeError(f"layer selector {selector!r} is not valid; use e.g. 'all', 'middle', '3-7' or '0,5,9'")
    if isinstance(selector, int):
        layers = [selector]
    elif isinstance(selector, str):
        sel = selector.strip().lower()
        third = [0, n_layers // 3, (2 * n_layers) // 3, n_layers]
        named = {
            "all": range(n_layers),
            "early": range(third[0], max(third[1], 1)),
            "middle": range(third[1], max(third[2], third[1] + 1)),
            "late": range(third[2], n_layers),
            "last": [n_layers - 1],
        }
        if sel in named:
            layers = list(named[sel])
        else:
            layers = []
            for part in sel.split(","):
                part = part.strip()
                match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
                if match:
                    lo, hi = int(match.group(1)), int(match.group(2))
                    if hi < lo:
                        raise MechsafeError(f"layer range {part!r} is empty; write it low-high, e.g. '3-7'")
                    layers.extend(range(lo, hi + 1))
                elif re.fullmatch(r"-?\d+", part):
                    layers.append(int(part))
                else:
                    raise MechsafeError(
                        f"layer selector {selector!r} is not valid; use one of {', '.join(NAMED_LAYER_SETS)}, "
                        "a range like '3-7' or a list like '0,5,9'"
                    )
    else:
        layers = [int(x) for x in selector]
    if not layers:
        raise MechsafeError(f"layer selector {selector!r} selects no layer; name at least one layer")
    resolved = []
    for layer in layers:
        idx = layer + n_layers if layer < 0 else layer
        if not 0 <= idx < n_layers:
            raise MechsafeError(f"layer {layer} is out of range; this model has layers 0-{n_layers - 1}")
        resolved.append(idx)
    return sorted(set(resolved))


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a known hook kind, else raise naming the valid kinds."""
    if kind not in HOOK_KINDS:
        raise MechsafeError(f"unknown hook kind {kind!r}; choose one of {', '.join(HOOK_KINDS)}")
    return kind


def check_hook(model: HookedTransformer, name: str) -> str:
    """Return ``name`` if the model has that hook point, else raise with close matches."""
    if name in model.hook_dict:
        return name
    import difflib

    close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"hook kinds: {', '.join(HOOK_KINDS)}"
    raise MechsafeError(f"the model has no hook {name!r}; {hint}")


def hook_name(model: HookedTransformer, kind: str, layer: int) -> str:
    """The validated hook name for ``kind`` at ``layer`` (negative layers count from the end)."""
    check_kind(kind)
    (idx,) = parse_layers(int(layer), model.cfg.n_layers)
    return check_hook(model, HOOK_KINDS[kind].format(layer=idx))


def hook_names(model: HookedTransformer, kind: str, layers: str | int | Sequence[int] = "all") -> list[str]:
    """Validated hook names for ``kind`` at every layer the selector picks."""
    check_kind(kind)
    return [hook_name(model, kind, layer) for layer in parse_layers(layers, model.cfg.n_layers)]


def layer_of(name: str) -> int:
    """The block index in a hook name such as ``blocks.12.hook_resid_post``."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise MechsafeError(f"hook {name!r} is not inside a block; use a 'blocks.<layer>.…' hook")
    return int(parts[1])


def kind_of(name: str) -> str:
    """The hook kind of a hook name built by :func:`hook_name`."""
    for kind, template in HOOK_KINDS.items():
        prefix, suffix = template.split("{layer}")
        if name.startswith(prefix) and name.endswith(suffix) and name[len(prefix):-len(suffix)].isdigit():
            return kind
    raise MechsafeError(f"hook {name!r} is not one of mechsafe's hook kinds ({', '.join(HOOK_KINDS)})")
