"""WaRP phase 3: fine-tuning with the important rotated coefficients frozen.

:class:`RotatedFreeze` is a gradient transform of the trainer (:mod:`mechsafe.finetune.transforms`): for each
protected weight it rotates the gradient into the basis (``g̃ = g U``), zeroes the masked coefficients and rotates
back, and does the same to each optimizer step's update (AdamW rescales coordinates and decays weights, so a
projected gradient alone would still move masked coefficients). Only the unmasked coefficients move; the masked
ones stay put up to float rounding. With the identity basis it is an exact freeze of weight entries.

Example::

    basis = compute_basis(model, cfg)                        # phase 1
    masks = make_masks(compute_importance(model, basis, seqs, cfg), 0.1)   # phase 2
    protected_finetune(model, ResponseNLL(pairs), basis, masks, FinetuneConfig(lr=5e-5, steps=40))   # phase 3
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch
from transformer_lens import HookedTransformer

from mechsafe.errors import MechsafeError
from mechsafe.finetune import FinetuneConfig, FinetuneResult, GradTransform, Objective, finetune
from mechsafe.warp.basis import Basis
from mechsafe.weights import WeightHandle, select


class RotatedFreeze(GradTransform):
    """Freeze masked coefficients of weights in rotated bases.

    ``us[name]``: the basis ``U`` (``[d_in, d_in]``, ``None`` for the identity); ``masks[name]``: boolean
    ``[d_out, d_in]`` masks in the linear layout of :func:`mechsafe.warp.importance.coefficients` (``True`` = frozen).
    """

    def __init__(self, handles: Sequence[WeightHandle], us: Mapping[str, torch.Tensor | None],
                 masks: Mapping[str, torch.Tensor]):
        self.handles = {h.name: h for h in handles}
        missing = sorted(set(self.handles) - set(masks))
        if missing:
            raise MechsafeError(f"no WaRP mask for {missing[0]}; make masks for every protected weight")
        self.us = {n: (None if us.get(n) is None else us[n].float()) for n in self.handles}
        self.masks = {n: masks[n].T.contiguous().bool() for n in self.handles}  # TransformerLens layout [d_in, d_out]
        self.names = frozenset(self.handles)

    def check(self, params) -> None:
        super().check(params)
        for name, h in self.handles.items():
            shape = tuple(h.as_matrix(params[name].detach()).shape)
            if tuple(self.masks[name].shape) != shape:
                raise MechsafeError(f"the WaRP mask of {name} has shape {tuple(self.masks[name].T.shape)}, which does "
                                    f"not fit the weight's {shape[::-1]}; make masks for this model")

    def project(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (of the weight's shape) with its masked coefficients removed."""
        h, u = self.handles[name], self.us[name]
        m = h.as_matrix(tensor)
        mask = self.masks[name].to(m.device)
        if u is None:
            return h.from_matrix(m.masked_fill(mask, 0))
        u = u.to(m.device)
        return h.from_matrix(u @ (u.T @ m).masked_fill_(mask, 0))

    def grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return self.project(name, grad) if name in self.names else grad

    def step(self, name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return old + self.project(name, new - old) if name in self.names else new


def protected_config(basis: Basis, config: FinetuneConfig | None = None) -> FinetuneConfig:
    """``config`` (default: the trainer's defaults) training exactly the basis's weights (``method="selected"``)."""
    kinds = tuple(dict.fromkeys(basis.manifest["kinds"][n] for n in basis.weights))
    layers = ",".join(str(i) for i in sorted({int(n.split(".")[1]) for n in basis.weights}))
    return dataclasses.replace(config or FinetuneConfig(), method="selected", targets=kinds, layers=layers)


def protected_finetune(model: HookedTransformer, objectives: Objective | Sequence[Objective], basis: Basis,
                       masks: Mapping[str, torch.Tensor], config: FinetuneConfig | None = None,
                       **kwargs) -> FinetuneResult:
    """Phase 3: fine-tune the basis's weights of ``model`` (in place) on ``objectives`` with the masked coefficients
    frozen. ``config`` gives the optimizer settings (its method, targets and layers are replaced); other keyword
    arguments go to :func:`mechsafe.finetune.finetune`."""
    config = protected_config(basis, config)
    handles = select(model, config.targets, config.layers)
    basis.check(model, handles)
    transform = RotatedFreeze(handles, {h.name: basis.u(h.name) for h in handles}, masks)
    extra = kwargs.pop("grad_transform", None)
    extra = [extra] if isinstance(extra, GradTransform) else list(extra or [])
    return finetune(model, objectives, config, grad_transform=[transform, *extra], **kwargs)
