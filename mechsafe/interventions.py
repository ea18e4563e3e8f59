"""Interventions on a ``HookedTransformer``: activation edits scoped to a ``with`` block, and weight edits.

Every activation intervention is a context manager that adds forward hooks on entry and removes
exactly those hooks in ``finally`` (also when the block raises), so interventions nest and never
leak into later runs::

    import mechsafe as ms
    from mechsafe import interventions as iv

    with iv.ablate_direction(model, r):              # x <- x - (x.r)r at every residual write
        texts = ms.evaluation.generate(model, prompts)
    with iv.steer(model, v, layers=[12], coeff=4.0):  # x <- x + 4 v at blocks.12.hook_resid_pre
        ...
    with iv.ablate_neurons(model, [(5, 17), (5, 99)]):
        ...
    with iv.patch(model, {"blocks.3.hook_resid_post": acts}):
        ...
    with iv.clamp_features(model, sae, {123: 10.0}):
        ...

Weight orthogonalization (Arditi et al., 2024) makes the same edit as directional ablation
permanent: every matrix that writes into the residual stream (token embedding, attention output,
MLP output, and their biases) loses its component along r̂. :func:`orthogonalize_weights` edits the
model in place and returns a handle whose ``undo()`` restores the original weights bit for bit;
:func:`orthogonalized_copy` edits a deep copy instead.

Pruning edits work the same way (an undo handle that is also a context manager, restoring bit-identical
weights): :func:`prune_weights` zeroes the entries of boolean weight masks (e.g. a SNIP group),
:func:`ablate_units` zeroes the weights of whole MLP neurons and attention heads, and :func:`remove_ranks` removes
output directions from weights (ActSVD)::

    with iv.prune_weights(model, group.masks):
        texts = ms.evaluation.generate(model, prompts)
    edit = iv.ablate_units(model, [(12, "neuron", 40), (3, "head", 2)]); ...; edit.undo()
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError, closest
from mechsafe.hooks import check_hook, hook_names, parse_layers
from mechsafe.weights import WEIGHT_KINDS, select, unit_masks, writing_weights

logger = logging.getLogger(__name__)

HookFn = Callable[..., Any]
"""A TransformerLens hook function ``fn(activation, hook) -> activation | None``."""

RESIDUAL_WRITES = ("resid_pre", "attn_out", "mlp_out")
"""Hook kinds directional ablation edits at every layer: each block's input and each residual write."""


@contextlib.contextmanager
def hooked(model: HookedTransformer, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[HookedTransformer]:
    """Add ``(hook_name, fn)`` forward hooks for the duration of the block; remove exactly them after.

    Hook names are validated against the model first, so a typo adds nothing and raises.
    Other hooks on the model (e.g. from an enclosing intervention) are left alone.
    """
    for name, _ in fwd_hooks:
        check_hook(model, name)
    added = []
    try:
        for name, fn in fwd_hooks:
            point = model.hook_dict[name]
            point.add_hook(fn, dir="fwd")
            added.append((point, point.fwd_hooks[-1]))
        yield model
    finally:
        for point, handle in reversed(added):
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)


def _unit(direction: torch.Tensor, d_model: int) -> Float[torch.Tensor, " d_model"]:
    r = torch.as_tensor(direction).detach().flatten().to(torch.float64)
    if r.numel() != d_model:
        raise MechsafeError(f"the direction has {r.numel()} entries but the model's d_model is {d_model}; "
                            "use a direction computed on this model")
    norm = r.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise MechsafeError("the direction is zero or not finite; compute it again from non-identical prompt sets")
    return r / norm


def _positions_index(positions: int | Sequence[int] | None) -> int | list[int] | slice:
    if positions is None:
        return slice(None)
    if isinstance(positions, int):
        return [positions]
    return [int(p) for p in positions]


def project_out(x: Float[torch.Tensor, "... d_model"], r_hat: Float[torch.Tensor, " d_model"]) -> Float[torch.Tensor, "... d_model"]:
    """``x - (x · r̂) r̂`` along the last dimension (``r̂`` must have unit norm)."""
    r = r_hat.to(device=x.device, dtype=x.dtype)
    return x - (x @ r).unsqueeze(-1) * r


@contextlib.contextmanager
def ablate_direction(model: HookedTransformer, direction: torch.Tensor,
                     layers: str | int | Sequence[int] = "all") -> Iterator[HookedTransformer]:
    """Directional ablation: ``x ← x − (x·r̂)r̂`` at ``resid_pre``, ``attn_out`` and ``mlp_out`` of ``layers``.

    With all layers (the default) the residual stream never carries a component along r̂: each
    block's input and everything written into the stream is projected, which also covers the final
    ``resid_post``.
    """
    r_hat = _unit(direction, model.cfg.d_model)
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def fn(x: Float[torch.Tensor, "batch pos d_model"], hook=None):
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = r_hat.to(device=x.device, dtype=x.dtype)
        r = cache[key]
        return x - (x @ r).unsqueeze(-1) * r

    names = [name for kind in RESIDUAL_WRITES for name in hook_names(model, kind, layers)]
    with hooked(model, [(name, fn) for name in names]):
        yield model


def residual_read_points(model: HookedTransformer) -> list[str]:
    """Where the residual stream is read: each block's attention input (``resid_pre``) and MLP input (``resid_mid``),
    then the final residual (``resid_post`` of the last block)."""
    n = model.cfg.n_layers
    return ([name for layer in range(n) for name in (hook_names(model, "resid_pre", layer)[0],
                                                    hook_names(model, "resid_mid", layer)[0])]
            + hook_names(model, "resid_post", n - 1))


@contextlib.contextmanager
def affine_ablation(model: HookedTransformer, direction: torch.Tensor,
                    reference: Float[torch.Tensor, " n_points"]) -> Iterator[HookedTransformer]:
    """Affine ablation (the projection part of affine concept editing, Marshall et al., 2024): ``x ← x − (x·r̂ − c) r̂``
    at each of :func:`residual_read_points`, ``c`` the matching ``reference`` entry (e.g. the mean component of harmless
    prompts there). Every sublayer then reads the reference component, whatever was written along r̂ before it; with a
    ``reference`` of zeros this computes what :func:`ablate_direction` computes."""
    r_hat = _unit(direction, model.cfg.d_model)
    names = residual_read_points(model)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    if reference.shape != (len(names),):
        raise MechsafeError(f"reference has shape {tuple(reference.shape)}; pass one value per read point ({len(names)})")

    def make(c: float):
        def fn(x: Float[torch.Tensor, "batch pos d_model"], hook=None):
            r = r_hat.to(device=x.device, dtype=x.dtype)
            return x - ((x @ r) - c).unsqueeze(-1) * r
        return fn

    with hooked(model, [(name, make(float(c))) for name, c in zip(names, reference)]):
        yield model


@contextlib.contextmanager
def steer(model: HookedTransformer, vector: torch.Tensor, layers: str | int | Sequence[int],
          coeff: float = 1.0, positions: int | Sequence[int] | None = None,
          hook: str = "resid_pre") -> Iterator[HookedTransformer]:
    """Activation addition: ``x ← x + coeff · vector`` at ``hook`` of each layer in ``layers``.

    ``vector`` is used as given (not normalized). ``positions`` (default: all) index the hooked
    activation's ``pos`` dimension; under KV-cached generation the shared prompt prefix, the rest of the
    prompt and each decoding step are separate forward passes (``generate(share_prefix=False)`` runs the
    whole prompt in one), so position lists are meant for single forward passes.
    """
    v = torch.as_tensor(vector).detach().flatten()
    names = hook_names(model, hook, layers)
    idx = _positions_index(positions)
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def fn(x: torch.Tensor, hook=None):
        if x.shape[-1] != v.numel():
            raise MechsafeError(f"the steering vector has {v.numel()} entries but {hook.name} has width "
                                f"{x.shape[-1]}; pick a hook of that width")
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (coeff * v.to(torch.float64)).to(device=x.device, dtype=x.dtype)
        x = x.clone()
        x[:, idx] = x[:, idx] + cache[key]
        return x

    with hooked(model, [(name, fn) for name in names]):
        yield model


def _neuron_table(model: HookedTransformer, neurons: Sequence[tuple[int, int]], hook: str) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for item in neurons:
        try:
            layer, idx = (int(v) for v in item)
        except (TypeError, ValueError):
            raise MechsafeError(f"neuron {item!r} is not a (layer, index) pair; pass e.g. [(5, 17), (5, 99)]") from None
        (layer,) = parse_layers(layer, model.cfg.n_layers)
        name = hook_names(model, hook, [layer])[0]
        table.setdefault(name, []).append(idx)
    return table


@contextlib.contextmanager
def ablate_neurons(model: HookedTransformer, neurons: Sequence[tuple[int, int]], mode: str = "zero",
                   means: Mapping[Any, Any] | None = None, hook: str = "mlp_post") -> Iterator[HookedTransformer]:
    """Set the given ``(layer, index)`` neurons of ``hook`` to zero or to their mean activation.

    ``mode="mean"`` needs ``means``: either ``{layer: Tensor[width]}`` (mean activation of every unit
    of that layer's hook) or ``{(layer, index): value}``.
    """
    if mode not in ("zero", "mean"):
        raise MechsafeError(f"unknown neuron ablation mode {mode!r}; use 'zero' or 'mean'")
    if mode == "mean" and not means:
        raise MechsafeError("mode='mean' needs means: {layer: tensor of mean activations} or {(layer, index): value}")
    table = _neuron_table(model, neurons, hook)
    hooks = []
    for name, idx in table.items():
        layer = int(name.split(".")[1])
        values = None
        if mode == "mean":
            vals = []
            for i in idx:
                if (layer, i) in means:
                    vals.append(float(means[(layer, i)]))
                elif layer in means:
                    vals.append(float(torch.as_tensor(means[layer]).flatten()[i]))
                else:
                    raise MechsafeError(f"means has no value for neuron ({layer}, {i}); give one per ablated neuron")
            values = torch.tensor(vals)
        index = torch.tensor(sorted(set(idx)) if values is None else idx, dtype=torch.long)

        def fn(x: torch.Tensor, hook=None, index=index, values=values):
            if int(index.max()) >= x.shape[-1]:
                raise MechsafeError(f"neuron index {int(index.max())} is out of range for {hook.name} "
                                    f"(width {x.shape[-1]})")
            x = x.clone()
            x[..., index.to(x.device)] = 0.0 if values is None else values.to(device=x.device, dtype=x.dtype)
            return x

        hooks.append((name, fn))
    with hooked(model, hooks):
        yield model


@contextlib.contextmanager
def patch(model: HookedTransformer, cache_or_acts: Mapping[str, torch.Tensor],
          positions: int | Sequence[int] | None = None) -> Iterator[HookedTransformer]:
    """Replace activations with ones recorded from another run (an ``ActivationCache`` or a dict).

    Each recorded tensor must have the hooked activation's shape (a recorded batch of 1 is
    broadcast over the batch). With ``positions`` only those ``pos`` entries are replaced.
    """
    names = list(cache_or_acts.keys())
    if not names:
        raise MechsafeError("nothing to patch; pass a dict {hook_name: activations} or an ActivationCache")
    idx = _positions_index(positions)
    hooks = []
    for name in names:
        check_hook(model, name)
        recorded = cache_or_acts[name].detach()

        def fn(x: torch.Tensor, hook=None, recorded=recorded):
            src = recorded.to(device=x.device, dtype=x.dtype)
            if src.shape[1:] != x.shape[1:] or src.shape[0] not in (1, x.shape[0]):
                raise MechsafeError(f"recorded activations for {hook.name} have shape {tuple(src.shape)} but the "
                                    f"run has {tuple(x.shape)}; record them on prompts of the same length")
            x = x.clone()
            x[:, idx] = src.expand_as(x)[:, idx]
            return x

        hooks.append((name, fn))
    with hooked(model, hooks):
        yield model


def sae_hook_name(sae: Any) -> str:
    """The hook an SAE reads: ``sae.hook_name``, or SAE-Lens's ``sae.cfg.metadata.hook_name``."""
    for getter in (lambda s: s.hook_name, lambda s: s.cfg.metadata.hook_name, lambda s: s.cfg.hook_name):
        try:
            name = getter(sae)
        except AttributeError:
            continue
        if name:
            return str(name)
    raise MechsafeError("the SAE does not say which hook it reads; give it a hook_name attribute")


@contextlib.contextmanager
def clamp_features(model: HookedTransformer, sae: Any, features: Mapping[int, float]) -> Iterator[HookedTransformer]:
    """Clamp SAE features at the SAE's hook, keeping the SAE's reconstruction error.

    ``x ← x − decode(encode(x)) + decode(f')`` where ``f'`` is ``encode(x)`` with each feature in
    ``features`` set to its value. The SAE needs ``hook_name``, ``encode(x)`` and ``decode(f)``.
    """
    name = check_hook(model, sae_hook_name(sae))
    if not features:
        raise MechsafeError("no features to clamp; pass {feature_index: value}")
    index = torch.tensor([int(k) for k in features], dtype=torch.long)
    values = torch.tensor([float(v) for v in features.values()])

    def fn(x: torch.Tensor, hook=None):
        with torch.no_grad():
            f = sae.encode(x)
            if int(index.max()) >= f.shape[-1]:
                raise MechsafeError(f"feature {int(index.max())} is out of range; the SAE has {f.shape[-1]} features")
            clamped = f.clone()
            clamped[..., index.to(f.device)] = values.to(device=f.device, dtype=f.dtype)
            delta = sae.decode(clamped) - sae.decode(f)
        return x + delta.to(device=x.device, dtype=x.dtype)

    with hooked(model, [(name, fn)]):
        yield model


# --- weight edits ---------------------------------------------------------------------------

class WeightEdit:
    """Undo handle of an in-place weight edit; also a context manager that undoes on exit.

    It keeps the original values of exactly the entries the edit changed (all of a parameter, or the entries of a
    mask), so ``undo()`` restores the weights bit for bit.
    """

    def __init__(self, model: HookedTransformer, saved: Mapping[str, tuple[torch.nn.Parameter, torch.Tensor | None,
                                                                              torch.Tensor]]):
        self.model = model
        self._saved = dict(saved)
        self.undone = False

    @property
    def names(self) -> list[str]:
        """Names of the edited parameters."""
        return list(self._saved)

    def undo(self) -> None:
        """Restore the original weights exactly (a no-op when already undone)."""
        if self.undone:
            return
        with torch.no_grad():
            for param, mask, values in self._saved.values():
                if mask is None:
                    param.copy_(values)
                else:
                    param[mask] = values
        self.undone = True

    def __enter__(self) -> HookedTransformer:
        return self.model

    def __exit__(self, *exc) -> None:
        self.undo()


def _full_edit(model: HookedTransformer, params: Mapping[str, torch.nn.Parameter],
               edit: Callable[[str, torch.Tensor], torch.Tensor]) -> WeightEdit:
    """Replace each parameter by ``edit(name, float64 copy)`` (cast back), keeping the originals for undo."""
    saved = {name: (p, None, p.detach().clone()) for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(edit(name, p.detach().to(torch.float64)).to(p.dtype))
    return WeightEdit(model, saved)


def orthogonalize_weights(model: HookedTransformer, direction: torch.Tensor) -> WeightEdit:
    """Edit every residual-writing weight so it cannot write along r̂: ``W ← W − (W r̂) r̂ᵀ``.

    Edits ``W_E`` [d_vocab, d_model], each attention ``W_O`` [n_heads, d_head, d_model] and
    ``b_O``, each MLP ``W_out`` [d_mlp, d_model] and ``b_out`` (and ``W_pos`` for learned positional
    embeddings). With all of them edited the model computes what :func:`ablate_direction` computes.
    Returns a handle: ``handle.undo()`` (or leaving ``with handle:``) restores the exact originals.
    """
    r_hat = _unit(direction, model.cfg.d_model)
    params = dict(writing_weights(model))

    def edit(name: str, w: torch.Tensor) -> torch.Tensor:
        r = r_hat.to(w.device, torch.float64)
        return w - (w @ r).unsqueeze(-1) * r

    handle = _full_edit(model, params, edit)
    logger.info("orthogonalized %d weights against a direction", len(params))
    return handle


def orthogonalized_copy(model: HookedTransformer, direction: torch.Tensor) -> HookedTransformer:
    """A deep copy of ``model`` with :func:`orthogonalize_weights` applied (the original is untouched)."""
    clone = copy.deepcopy(model)
    orthogonalize_weights(clone, direction)
    return clone


def prune_weights(model: HookedTransformer, masks: Mapping[str, torch.Tensor]) -> WeightEdit:
    """Set the weights where ``masks[name]`` is True to zero (``name``: a parameter name, e.g. from
    :func:`mechsafe.weights.select` or a saved group). Returns an undo handle."""
    params = dict(model.named_parameters())
    if not masks:
        raise MechsafeError("no weight masks given; pass {parameter name: boolean mask}")
    for name, mask in masks.items():
        if name not in params:
            raise MechsafeError(f"the model has no weight {name!r}{closest(name, params)}; masks must come from this "
                                "model's weights")
        if tuple(mask.shape) != tuple(params[name].shape) or mask.dtype != torch.bool:
            raise MechsafeError(f"the mask of {name} is {mask.dtype} {tuple(mask.shape)}, the weight is "
                                f"{tuple(params[name].shape)}; pass boolean masks of the weights' shapes")
    saved = {}
    with torch.no_grad():
        for name, mask in masks.items():
            p, m = params[name], mask.to(params[name].device)
            saved[name] = (p, m, p[m].clone())
            p[m] = 0
    logger.info("pruned %d weights in %d parameters", sum(int(m.sum()) for m in masks.values()), len(masks))
    return WeightEdit(model, saved)


def ablate_units(model: HookedTransformer, units: Sequence[tuple[int, str, int]],
                 kinds: Sequence[str] = WEIGHT_KINDS) -> WeightEdit:
    """Zero the weights of ``(layer, "neuron"|"head", index)`` units (see :func:`mechsafe.weights.unit_masks`);
    an undo handle. Unlike :func:`ablate_neurons` (a hook on activations) this edits the weights."""
    if not units:
        raise MechsafeError("no units to ablate; pass (layer, 'neuron' or 'head', index) triples")
    return prune_weights(model, unit_masks(model, units, kinds))


def remove_ranks(model: HookedTransformer, directions: Mapping[str, torch.Tensor],
                 keep: Mapping[str, torch.Tensor] | None = None) -> WeightEdit:
    """Remove output directions from weights (ActSVD, Wei et al. 2024): with ``W`` the weight as a
    ``d_out x d_in`` matrix and ``V = directions[name]`` (``d_out x r``, orthonormal columns), ``Π = V Vᵀ`` and
    ``W ← W − Π W``; with ``keep[name] = V_u`` the orthogonal variant ``W ← W − (I − Π_u) Π W`` leaves the
    ``V_u`` directions of the output alone. Returns an undo handle."""
    if not directions:
        raise MechsafeError("no directions to remove; pass {parameter name: d_out x r matrix}")
    handles = {h.name: h for h in select(model, skip_missing=True)}
    for name, v in directions.items():
        if name not in handles:
            raise MechsafeError(f"{name!r} is not a block weight of this model; name weights as mechsafe.weights.select does")
        d_out = handles[name].as_matrix(handles[name].parameter).shape[1]
        for which, t in (("directions", v), ("keep", (keep or {}).get(name))):
            if t is not None and (t.dim() != 2 or t.shape[0] != d_out):
                raise MechsafeError(f"{which} of {name} have shape {tuple(t.shape)}; expected [{d_out}, rank]")

    def edit(name: str, w: torch.Tensor) -> torch.Tensor:
        h = handles[name]
        m = h.as_matrix(w)  # [d_in, d_out] = W^T
        v = directions[name].to(w.device, torch.float64)
        removed = (m @ v) @ v.T  # (Π W)^T = W^T Π
        if keep is not None and name in keep:
            u = keep[name].to(w.device, torch.float64)
            removed = removed - (removed @ u) @ u.T  # ((I − Π_u) Π W)^T
        return h.from_matrix(m - removed)

    return _full_edit(model, {name: handles[name].parameter for name in directions}, edit)
