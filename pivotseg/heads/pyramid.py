"""Simple feature pyramid: multi-stride maps from a backbone whose levels share one stride.

A plain ViT gives every chosen block at stride 16 (patch 16). Decode heads built for CNN
pyramids want strides 4/8/16/32, so each level ``i`` is resampled from its own stride to the
target stride ``4 * 2**i`` (ViTDet's "simple feature pyramid"; Rein does the same with bilinear
interpolation). Hierarchical backbones (e.g. TinyViT at strides 8/16/16/16) go through the same
code: every level gets whatever ratio separates its stride from its target.

Two ways to resample, chosen by ``mode``:

* ``"deconv"`` (ViTDet, mmseg ``Feature2Pyramid`` as used by VLTSeg): learnt 2x2 stride-2
  transposed convolutions up (GroupNorm + GELU between two of them for x4), max-pooling down.
* ``"interpolate"`` (Rein's DINOv2 backbone): parameter-free bilinear resizing both ways.

Normalisation is GroupNorm, not (Sync)BatchNorm: it behaves the same at batch 1, on one or many
GPUs, and needs no ``revert_sync_batchnorm`` for CPU runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PYRAMID_MODES = ("deconv", "interpolate")


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= ``max_groups``) of at least two channels each.

    Two channels per group keep a 1x1 map (the stride-32 level of a small crop) normalisable.
    """
    groups = math.gcd(max_groups, max(channels // 2, 1))
    return nn.GroupNorm(groups, channels)


def default_target_strides(num_levels: int) -> list[int]:
    """4, 8, 16, 32, ... : one octave per level, starting at stride 4."""
    return [4 * 2**i for i in range(num_levels)]


class Resize(nn.Module):
    """Bilinear resizing by a fixed factor (a module so that it sits in an ``nn.Sequential``)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _octaves(source: int, target: int) -> int:
    """Signed number of 2x steps from ``source`` to ``target`` stride (+ means upsampling)."""
    ratio = source / target
    steps = round(math.log2(ratio))
    if 2.0**steps != ratio:
        raise ValueError(
            f"feature pyramid: stride {source} -> {target} is not a power-of-two resampling; "
            "choose target strides that are power-of-two multiples of the backbone strides"
        )
    return steps


def resampler(channels: int, source: int, target: int, mode: str = "deconv") -> nn.Module:
    """The module that takes a ``(B, channels, h, w)`` map from ``source`` to ``target`` stride."""
    if mode not in PYRAMID_MODES:
        raise ValueError(f"feature pyramid: unknown mode {mode!r}; use one of {PYRAMID_MODES}")
    steps = _octaves(source, target)
    if steps == 0:
        return nn.Identity()
    if mode == "interpolate":
        return Resize(2.0**steps)
    if steps < 0:
        return nn.MaxPool2d(kernel_size=2**-steps, stride=2**-steps)
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [group_norm(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """Resample each backbone level to its own target stride (one output per input level).

    Args:
        in_dims: channels of each backbone level.
        in_strides: stride of each backbone level (all 16 for a ViT-L/16).
        target_strides: stride wanted for each level; default 4, 8, 16, 32, ...
        mode: ``"deconv"`` or ``"interpolate"`` (see the module docstring).
        out_dim: if given, a 1x1 convolution first maps every level to this width, so that the
            resampling runs on ``out_dim`` channels (cheap heads); otherwise widths are kept.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        in_strides: Sequence[int],
        target_strides: Sequence[int] | None = None,
        mode: str = "deconv",
        out_dim: int | None = None,
    ):
        super().__init__()
        if len(in_dims) != len(in_strides):
            raise ValueError(f"feature pyramid: {len(in_dims)} dims but {len(in_strides)} strides")
        targets = list(target_strides or default_target_strides(len(in_dims)))
        if len(targets) != len(in_dims):
            raise ValueError(
                f"feature pyramid: {len(in_dims)} backbone levels but {len(targets)} target strides"
            )
        if out_dim is not None:
            self.projections = nn.ModuleList(nn.Conv2d(c, out_dim, 1) for c in in_dims)
            dims = [out_dim] * len(in_dims)
        else:
            self.projections = None
            dims = list(in_dims)
        self.resamplers = nn.ModuleList(
            resampler(c, s, t, mode) for c, s, t in zip(dims, in_strides, targets)
        )
        self.in_strides = list(in_strides)
        self.out_dims = dims
        self.out_strides = targets
        self.mode = mode

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.resamplers):
            raise ValueError(
                f"feature pyramid: expected {len(self.resamplers)} levels, got {len(features)}"
            )
        if self.projections is not None:
            features = [proj(f) for proj, f in zip(self.projections, features)]
        return [resample(f) for resample, f in zip(self.resamplers, features)]
