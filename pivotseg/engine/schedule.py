"""Learning-rate schedules counted in optimiser steps (iterations), not epochs.

DGSS recipes (Rein, VLTSeg) use a linear warm-up followed by a polynomial decay
(mmengine's ``LinearLR`` then ``PolyLR(power=0.9)``). Here both are one multiplicative factor
of each parameter group's base learning rate, applied with :class:`torch.optim.lr_scheduler.LambdaLR`
so that per-group multipliers (backbone 0.1x, ...) keep their ratios through the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_poly_factor(
    iterations: int,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
    min_ratio: float = 0.0,
) -> Callable[[int], float]:
    """Factor of the base learning rate at optimiser step ``step`` (0-based).

    Warm-up: linear from ``warmup_ratio`` at step 0 to 1 at step ``warmup_iters``.
    Then poly decay over the remaining ``iterations - warmup_iters`` steps:
    ``(1 - min_ratio) * (1 - t / T) ** power + min_ratio`` with ``t = step - warmup_iters`` and
    ``T = iterations - warmup_iters``, as mmengine's ``PolyLR`` with ``begin=warmup_iters``.

    Args:
        iterations: total optimiser steps of the run.
        warmup_iters: length of the linear warm-up (0 for none).
        warmup_ratio: factor at step 0 of the warm-up.
        power: exponent of the poly decay (0.9 in the DGSS recipes).
        min_ratio: the factor the decay ends at (``min_lr / lr``).
    """
    if iterations <= 0:
        raise ValueError(f"iterations must be positive, got {iterations}")
    if not 0 <= warmup_iters < iterations:
        raise ValueError(f"warmup_iters must be in [0, {iterations}), got {warmup_iters}")
    decay_steps = iterations - warmup_iters

    def factor(step: int) -> float:
        if step < warmup_iters:
            return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_iters
        progress = min(step - warmup_iters, decay_steps) / decay_steps
        return (1.0 - min_ratio) * (1.0 - progress) ** power + min_ratio

    return factor


def build_scheduler(
    optimizer: Optimizer,
    iterations: int,
    warmup_iters: int = 0,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
    min_ratio: float = 0.0,
) -> LambdaLR:
    """A :class:`LambdaLR` stepping :func:`warmup_poly_factor` once per optimiser step."""
    return LambdaLR(
        optimizer, warmup_poly_factor(iterations, warmup_iters, warmup_ratio, power, min_ratio)
    )
