"""Optimiser, parameter groups and the global-batch arithmetic."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from pivotseg.errors import ConfigError


def accumulation_steps(
    global_batch_size: int, world_size: int, per_device_batch_size: int | None = None
) -> tuple[int, int]:
    """Split a global batch over devices: returns ``(per_device_batch_size, accumulation)``.

    The recipe states the batch one optimiser step sees (``global_batch_size``); on ``world_size``
    processes each one runs ``accumulation`` forward/backward passes of ``per_device_batch_size``
    images before the step, so ``per_device * world * accumulation == global`` on any number
    of devices and the learning rate never needs rescaling by hand.

    Args:
        global_batch_size: images per optimiser step, summed over all processes.
        world_size: number of processes.
        per_device_batch_size: images per forward pass; ``None`` puts the whole share of a
            process in one pass (no accumulation).
    """
    if global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} does not split over {world_size} "
            f"processes; use a multiple of {world_size} or another number of processes"
        )
    share = global_batch_size // world_size
    if per_device_batch_size is None:
        return share, 1
    if per_device_batch_size < 1 or share % per_device_batch_size:
        valid = [d for d in range(1, share + 1) if share % d == 0]
        raise ConfigError(
            f"train.per_device_batch_size={per_device_batch_size} does not divide the "
            f"{share} images each of {world_size} processes gets per step "
            f"(train.global_batch_size={global_batch_size}); use one of {valid}"
        )
    return per_device_batch_size, share // per_device_batch_size


def default_param_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Two groups over trainable parameters: with decay, and without for biases and norms.

    Used for models that do not offer ``param_groups(lr, weight_decay)`` themselves. Every
    parameter of one dimension (biases, norm scales, learnable scalars) goes without decay.
    """
    decay, no_decay = [], []
    for _, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(
    param_groups: Sequence[dict],
    lr: float,
    weight_decay: float,
    betas: Iterable[float] = (0.9, 0.999),
    *,
    name: str = "adamw",
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The optimiser over ``param_groups``; a group's own ``lr``/``weight_decay`` win.

    Args:
        param_groups: torch parameter groups (e.g. ``Segmenter.param_groups``); per-group
            learning rates and weight decays from the tuning method's rules are kept as given.
        lr, weight_decay: defaults for groups that do not set their own.
        betas: AdamW's moment decays (ignored by SGD).
        name: ``adamw`` (decoupled weight decay) or ``sgd`` (heavy-ball momentum, no Nesterov,
            weight decay added to the gradient as L2, as FAMix's and mmseg's SGD recipes).
        momentum: SGD's momentum (ignored by AdamW).

    Raises:
        ConfigError: an unknown ``name``, or nothing to train.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={name!r} is unknown; use one of {', '.join(OPTIMIZERS)}"
        )
    groups = [{**g, "params": list(g["params"])} for g in param_groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(
            "the model has no trainable parameters; check model.method (frozen trains the head)"
        )
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False
        )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
