"""Gradient transforms: constraints on what a fine-tuning step may change.

A transform acts twice per optimizer step on each parameter it names (parameter names as in
``model.named_parameters()``, e.g. :attr:`mechsafe.weights.WeightHandle.name`):

* :meth:`GradTransform.grad` edits the gradient before clipping and the optimizer step;
* :meth:`GradTransform.step` edits the step's result ``new`` given the weights before it, ``old``.

The second half is what makes a constraint exact under AdamW: Adam divides each coordinate by its
own running scale, so a projected gradient does not give a projected update, and decoupled weight
decay moves every weight, masked or not. :class:`Freeze` keeps masked entries bit-identical;
:class:`Project` keeps each update inside a subspace (up to float rounding).

Example: freeze the 10 most safety-critical neurons of one MLP while fine-tuning every weight::

    h = ms.weights.weight(model, "mlp.W_out", 12)          # [d_mlp, d_model], neuron axis 0
    mask = torch.zeros(h.shape, dtype=torch.bool); mask[top10] = True
    finetune(model, objectives, FinetuneConfig(method="full"), grad_transform=Freeze({h.name: mask}))
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from mechsafe.errors import MechsafeError


class GradTransform:
    """Base class: the identity on the parameters in ``names``."""

    names: frozenset[str] = frozenset()

    def grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of parameter ``name`` to use."""
        return grad

    def step(self, name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Parameter ``name`` after the step, given its values before (``old``) and the optimizer's result (``new``)."""
        return new

    def check(self, params: Mapping[str, torch.Tensor]) -> None:
        """Raise naming the problem when a named parameter is not trained or has another shape."""
        missing = sorted(set(self.names) - set(params))
        if missing:
            raise MechsafeError(f"{type(self).__name__} names parameters that are not trained: {missing[:3]}; "
                                f"trained parameters look like {sorted(params)[:3]}")


class Freeze(GradTransform):
    """Keep chosen entries of chosen parameters exactly as they are.

    ``masks[name]`` is a boolean tensor of the parameter's shape (or one that broadcasts to it), ``True`` where
    the entry is frozen: its gradient is zeroed and, after each step, its old value is put back bit for bit
    (so neither Adam's momentum nor weight decay moves it).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        if not masks:
            raise MechsafeError("Freeze needs at least one parameter mask; pass {parameter name: bool tensor}")
        self.masks = {name: torch.as_tensor(m, dtype=torch.bool) for name, m in masks.items()}
        self.names = frozenset(self.masks)

    def check(self, params: Mapping[str, torch.Tensor]) -> None:
        super().check(params)
        for name, mask in self.masks.items():
            try:
                torch.broadcast_shapes(mask.shape, params[name].shape)
            except RuntimeError:
                raise MechsafeError(f"the Freeze mask of {name} has shape {tuple(mask.shape)}, which does not fit the "
                                    f"parameter's {tuple(params[name].shape)}") from None

    def grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        return grad if mask is None else grad.masked_fill(mask.to(grad.device), 0)

    def step(self, name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        mask = self.masks.get(name)
        return new if mask is None else torch.where(mask.to(new.device), old, new)


class Project(GradTransform):
    """Keep each chosen parameter's updates inside a subspace.

    ``projections[name]`` maps a tensor of the parameter's shape to its projection (a linear, idempotent map,
    e.g. ``lambda x: Q @ (Q.T @ x)`` for an orthonormal basis ``Q``): it is applied to the gradient and to each
    step's update ``new - old``, so the parameter only ever moves inside the subspace.
    """

    def __init__(self, projections: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]):
        if not projections:
            raise MechsafeError("Project needs at least one projection; pass {parameter name: function}")
        self.projections = dict(projections)
        self.names = frozenset(self.projections)

    def grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        fn = self.projections.get(name)
        return grad if fn is None else fn(grad)

    def step(self, name: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        fn = self.projections.get(name)
        return new if fn is None else old + fn(new - old)
