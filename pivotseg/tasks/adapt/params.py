"""Which tensors of a segmenter adapt, and snapshots of them to swap in and out.

The mean teacher, the source copy (for stochastic restore and resets) and the student share one
model: only the few adapted tensors are kept in several versions and copied in for a forward,
so adapting DINOv2-L costs no second copy of the backbone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def norm_affine_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the affine weight/bias of every normalisation layer (TENT).

    A normalisation layer is any module whose class name contains ``Norm`` (LayerNorm,
    GroupNorm, BatchNorm and the backbones' own, e.g. TinyViT's fixed-statistics BatchNorm and
    SAM's LayerNorm2d), the rule the ``full`` method uses for its no-decay group.
    """
    out = []
    for module_name, module in model.named_modules():
        if "Norm" not in type(module).__name__:
            continue
        for leaf, param in module.named_parameters(recurse=False):
            if leaf in ("weight", "bias"):
                out.append((f"{module_name}.{leaf}" if module_name else leaf, param))
    return out


@contextmanager
def only_these_require_grad(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only; every flag is put back afterwards, so that the saved
    checkpoint holds the same keys as the source's (``trainable_state_dict``)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class TensorSet:
    """Live named tensors of a model (parameters or buffers) and copies of their values."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.tensors.items()}

    @torch.no_grad()
    def load(self, values: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors.items():
            t.copy_(values[name])

    @contextmanager
    def holding(self, values: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model computes with ``values`` inside the block, with its own ones after."""
        own = self.snapshot()
        self.load(values)
        try:
            yield
        finally:
            self.load(own)
