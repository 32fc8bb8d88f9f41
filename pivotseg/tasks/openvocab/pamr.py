"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), NACLIP's post-processing.

Each pixel ``i`` looks at 8 neighbours ``j`` at each dilation ``d`` (offsets ``{-d, 0, d}²``
without ``(0, 0)``; borders replicate). Its affinities come from the image:

    a_ij = softmax_j( mean_c( -|I_c(i) - I_c(j)| / (1e-8 + 0.1 · σ_c(i)) ) )

where ``σ_c(i)`` is the (unbiased) standard deviation of channel ``c`` over the 3x3 neighbourhoods
of ``i`` at every dilation (the centre counted once per dilation). The masks are then propagated
``iterations`` times: ``m(i) <- Σ_j a_ij m(j)``. NACLIP uses 10 iterations with dilations 8 and
16, on the cosine-similarity maps at image resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _offsets(dilation: int, with_centre: bool) -> list[tuple[int, int]]:
    steps = (-dilation, 0, dilation)
    return [(dy, dx) for dy in steps for dx in steps if with_centre or (dy, dx) != (0, 0)]


def shifted_views(x: torch.Tensor, offsets: Sequence[tuple[int, int]], pad: int):
    """``x`` read at ``(i + dy, j + dx)`` for each offset, borders replicated (views of one
    padded copy, so memory stays at one extra tensor whatever the number of offsets)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return [padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w] for dy, dx in offsets]


class PAMR(nn.Module):
    """Refine per-class maps with image-driven local affinities.

    Args:
        iterations: propagation steps (NACLIP: 10).
        dilations: neighbourhood dilations in pixels (NACLIP: 8 and 16).
    """

    def __init__(self, iterations: int = 10, dilations: Sequence[int] = (8, 16)):
        super().__init__()
        self.iterations = int(iterations)
        self.dilations = tuple(int(d) for d in dilations)
        self._pad = max(self.dilations)
        self._neighbours = [o for d in self.dilations for o in _offsets(d, with_centre=False)]
        self._window = [o for d in self.dilations for o in _offsets(d, with_centre=True)]

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, P, H, W)`` weights over the P neighbours of each pixel (sum to 1 over P)."""
        image = image.float()
        window = shifted_views(image, self._window, self._pad)
        mean = sum(window) / len(window)
        var = sum((v - mean).square() for v in window) / (len(window) - 1)
        scale = 1e-8 + 0.1 * var.sqrt()
        logits = [
            (-(image - v).abs() / scale).mean(dim=1)
            for v in shifted_views(image, self._neighbours, self._pad)
        ]
        return torch.stack(logits, dim=1).softmax(dim=1)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Refined ``masks`` ``(B, K, H, W)`` at the image size.

        Args:
            image: ``(B, C, H, W)`` (any per-channel scale: the affinity divides by local std).
            masks: ``(B, K, h, w)`` scores, resized bilinearly to ``H x W`` first.
        """
        size = image.shape[-2:]
        if masks.shape[-2:] != size:
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        weights = self.affinity(image)  # (B, P, H, W)
        out = masks.float()
        for _ in range(self.iterations):
            views = shifted_views(out, self._neighbours, self._pad)
            out = sum(weights[:, j : j + 1] * v for j, v in enumerate(views))
        return out.to(masks.dtype)
