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
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.hooks import check_hook, hook_names, parse_layers
from mechsafe.weights import writing_weights

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


# --- weight orthogonalization ----------------------------------------------------------------

class OrthogonalizedWeights:
    """Undo handle of :func:`orthogonalize_weights`; also a context manager that undoes on exit."""

    def __init__(self, model: HookedTransformer, originals: dict[str, torch.Tensor],
                 params: dict[str, torch.nn.Parameter]):
        self.model = model
        self._originals = originals
        self._params = params
        self.undone = False

    @property
    def names(self) -> list[str]:
        """Names of the edited parameters."""
        return list(self._params)

    def undo(self) -> None:
        """Restore the original weights exactly (a no-op when already undone)."""
        if self.undone:
            return
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self._originals[name])
        self.undone = True

    def __enter__(self) -> HookedTransformer:
        return self.model

    def __exit__(self, *exc) -> None:
        self.undo()


def orthogonalize_weights(model: HookedTransformer, direction: torch.Tensor) -> OrthogonalizedWeights:
    """Edit every residual-writing weight so it cannot write along r̂: ``W ← W − (W r̂) r̂ᵀ``.

    Edits ``W_E`` [d_vocab, d_model], each attention ``W_O`` [n_heads, d_head, d_model] and
    ``b_O``, each MLP ``W_out`` [d_mlp, d_model] and ``b_out`` (and ``W_pos`` for learned positional
    embeddings). With all of them edited the model computes what :func:`ablate_direction` computes.
    Returns a handle: ``handle.undo()`` (or leaving ``with handle:``) restores the exact originals.
    """
    r_hat = _unit(direction, model.cfg.d_model)
    params = dict(writing_weights(model))
    originals = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            w = p.detach().to(torch.float64)
            r = r_hat.to(w.device)
            p.copy_((w - (w @ r).unsqueeze(-1) * r).to(p.dtype))
    logger.info("orthogonalized %d weights against a direction", len(params))
    return OrthogonalizedWeights(model, originals, params)


def orthogonalized_copy(model: HookedTransformer, direction: torch.Tensor) -> HookedTransformer:
    """A deep copy of ``model`` with :func:`orthogonalize_weights` applied (the original is untouched)."""
    clone = copy.deepcopy(model)
    orthogonalize_weights(clone, direction)
    return clone
