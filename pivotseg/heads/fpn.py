"""A light FPN decode head (Semantic-FPN style) over a simple feature pyramid, cheap on CPU.

Pipeline: simple feature pyramid (whose per-level 1x1 projections act as FPN's lateral
convolutions, applied *before* resampling so the deconvolutions run at ``channels`` width) ->
top-down pathway (each level plus the upsampled coarser one) -> a 3x3 conv per level -> all
levels upsampled to the finest stride and summed -> 3x3 conv -> dropout -> 1x1 classifier.
The logits live at stride 4 and are bilinearly upsampled for the loss and for evaluation.

Normalisation is GroupNorm (see :mod:`pivotseg.heads.pyramid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.errors import ConfigError
from pivotseg.heads.base import IGNORE_INDEX, Head
from pivotseg.heads.pyramid import SimpleFeaturePyramid, group_norm


def conv_norm_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), group_norm(cout), nn.ReLU(inplace=True)
    )


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def semantic_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-wise cross-entropy after upsampling ``logits`` to the label size.

    ``weight``: one weight per class; the loss is then the weighted mean over pixels (torch's
    ``cross_entropy``). A batch whose pixels are all ignored gives a zero loss that still has a
    graph (the plain mean over zero pixels would be NaN).
    """
    logits = upsample_to(logits, labels.shape[-2:])
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index)


def class_weight_tensor(weights: Sequence[float], num_classes: int) -> torch.Tensor:
    """``head_args.ce_class_weights`` checked: one non-negative number per class."""
    values = [float(w) for w in weights]
    if len(values) != num_classes or min(values) < 0 or max(values) == 0:
        raise ConfigError(
            f"head_args.ce_class_weights has {len(values)} values: give {num_classes} "
            "non-negative numbers, not all 0 (e.g. median_frequency_weights of "
            "pivotseg.data.rare_classes)"
        )
    return torch.tensor(values, dtype=torch.float32)


class FPNHead(Head):
    """Light FPN head.

    Args:
        in_dims, in_strides: the backbone levels (``backbone.out_dims``, ``out_strides``).
        num_classes: K.
        channels: width of every FPN level (128 keeps CPU runs cheap).
        pyramid: ``"deconv"`` (learnt, ViTDet) or ``"interpolate"`` (Rein's bilinear).
        target_strides: pyramid strides, default 4/8/16/32.
        dropout: before the classifier (mmseg decode heads use 0.1).
        ignore_index: label value excluded from the loss.
        ce_class_weights: one weight per class for the cross-entropy (mmseg's
            ``class_weight``; e.g. median-frequency balancing for rare classes); ``None``: 1.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        channels: int = 128,
        pyramid: str = "deconv",
        target_strides: Sequence[int] | None = None,
        dropout: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
        ce_class_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        weight = None
        if ce_class_weights is not None:
            weight = class_weight_tensor(ce_class_weights, num_classes)
        # Not saved: head_args rebuild it, and checkpoints hold trained tensors only.
        self.register_buffer("ce_class_weights", weight, persistent=False)
        self.pyramid = SimpleFeaturePyramid(
            in_dims, in_strides, target_strides, mode=pyramid, out_dim=channels
        )
        levels = len(in_dims)
        self.output_convs = nn.ModuleList(conv_norm_act(channels, channels) for _ in range(levels))
        self.fuse = conv_norm_act(channels, channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features, queries=None) -> torch.Tensor:
        """Class logits ``(B, K, h, w)`` at the finest pyramid stride (``queries`` is unused)."""
        levels = self.pyramid(features)
        # Top-down: coarsest level first, each finer level adds the upsampled coarser result.
        merged = [levels[-1]]
        for lateral in reversed(levels[:-1]):
            merged.insert(0, lateral + upsample_to(merged[0], lateral.shape[-2:]))
        finest = merged[0].shape[-2:]
        fused = sum(upsample_to(conv(x), finest) for conv, x in zip(self.output_convs, merged))
        return self.classifier(self.dropout(self.fuse(fused)))

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = semantic_cross_entropy(outputs, labels, self.ignore_index, self.ce_class_weights)
        return {"loss_ce": loss}

    def logits(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return upsample_to(outputs, size)
