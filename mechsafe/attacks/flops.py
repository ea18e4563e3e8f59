"""Compute accounting: FLOPs of a training step or of forward passes, counted by ``torch.utils.flop_counter``.

The counter records every matrix product and attention kernel the step runs (forward and backward), so a LoRA
step counts the frozen base weights' forward and input-gradient products as well as the adapters'. An attack's
cost is its counted step FLOPs times its steps (each step's batch counted once, on the batch it trains on).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn()`` computes (forward and, if it calls it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def setup_and_step_flops(run: Callable[[Callable[[int, object], None]], object]) -> tuple[int, int]:
    """``run(callback)`` runs the trainer for one step with ``callback``; returns the FLOPs before the first step (the
    objectives' reference passes, paid once per run) and the FLOPs of the step, split where the trainer calls
    ``callback(0, model)``."""
    marks: list[int] = []
    with FlopCounterMode(display=False) as counter:
        run(lambda step, model: marks.append(counter.get_total_flops()) if step == 0 else None)
        total = counter.get_total_flops()
    setup = marks[0] if marks else 0
    return int(setup), int(total - setup)


def dense_estimate(n_params: int, n_tokens: int, backward: bool = True) -> int:
    """The usual estimate: ``2·params·tokens`` for a forward pass, ``6·params·tokens`` with the backward pass."""
    return (6 if backward else 2) * n_params * n_tokens


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
