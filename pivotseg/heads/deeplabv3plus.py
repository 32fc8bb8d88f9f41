"""DeepLabv3+ decode head (Chen et al., ECCV 2018), as FAMix uses it on CLIP ResNets.

High-level features (the last level given, e.g. layer4 at stride 16) go through ASPP: a 1x1
conv, three 3x3 convs dilated by ``aspp_rates`` and an image-pooling branch, each 256-d with
BatchNorm + ReLU, concatenated and projected back to 256-d (dropout 0.1). Low-level features
(the first level, e.g. layer1 at stride 4) are projected to 48-d (1x1 conv, BN, ReLU). The ASPP
output, upsampled to the low-level grid, is concatenated with them and classified by a 3x3 conv
(256-d, BN, ReLU) and a 1x1 conv. Logits live at the low-level stride and are upsampled
bilinearly for the loss and for evaluation. Convolutions start from Kaiming-normal weights, batch
norms from (1, 0), as FAMix's code.

``aspp_rates`` default to DeepLabv3+'s 12/24/36 (for output stride 8); FAMix's code picks 6/12/18
at output stride 16, which its recipe config sets. The loss is cross-entropy with optional label
smoothing (FAMix: 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.heads.base import IGNORE_INDEX, Head


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's global branch: average pool, 1x1 conv + BN + ReLU, broadcast back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling."""

    def __init__(self, cin: int, channels: int, rates: Sequence[int], dropout: float):
        super().__init__()
        branches = [conv_bn_relu(cin, channels)]
        branches += [conv_bn_relu(cin, channels, 3, r) for r in rates]
        branches.append(ImagePooling(cin, channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_relu(len(branches) * channels, channels), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3PlusHead(Head):
    """DeepLabv3+ head over the first (low-level) and last (high-level) backbone levels.

    Args:
        in_dims, in_strides: the backbone levels (``out_dims``, ``out_strides``); the first is
            the low-level input, the last the ASPP input (FAMix: layer1 and layer4).
        num_classes: K.
        aspp_rates: dilations of the three 3x3 ASPP branches.
        channels: ASPP and decoder width (256).
        low_level_channels: width of the projected low-level features (48).
        dropout: after the ASPP projection (0.1).
        label_smoothing: of the cross-entropy (FAMix 0.1).
        ignore_index: label value excluded from the loss.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        aspp_rates: Sequence[int] = (12, 24, 36),
        channels: int = 256,
        low_level_channels: int = 48,
        dropout: float = 0.1,
        label_smoothing: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError("deeplabv3plus: needs a low-level and a high-level feature map")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.low_stride = in_strides[0]
        self.project_low = conv_bn_relu(in_dims[0], low_level_channels)
        self.aspp = ASPP(in_dims[-1], channels, aspp_rates, dropout)
        self.decoder = conv_bn_relu(low_level_channels + channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features, queries=None) -> torch.Tensor:
        """Logits ``(B, K, h, w)`` on the low-level grid (``queries`` is unused)."""
        low = self.project_low(features[0])
        high = self.aspp(features[-1])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.decoder(torch.cat([low, high], dim=1)))

    def logits(self, outputs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(outputs.shape[-2:]) == tuple(size):
            return outputs
        return F.interpolate(outputs, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.logits(outputs, labels.shape[-2:])
        if not (labels != self.ignore_index).any():
            return {"loss_ce": logits.sum() * 0.0}
        loss = F.cross_entropy(
            logits, labels, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
        )
        return {"loss_ce": loss}
