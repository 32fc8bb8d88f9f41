"""FAMix's patch arithmetic: the 3x3 grid, per-patch statistics, dominant classes and mixing.

Patch statistics follow FAMix's ``calc_mean_std``: unbiased variance + 1e-5, square root.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

EPS = 1e-5
IGNORE_INDEX = 255


def grid_bounds(n: int, parts: int) -> list[int]:
    """``parts + 1`` cut points splitting ``n`` cells as evenly as possible."""
    return [round(i * n / parts) for i in range(parts + 1)]


def patch_regions(hw: tuple[int, int], parts: int = 3) -> list[tuple[slice, slice]]:
    """The ``parts x parts`` patches of an ``(h, w)`` grid, row-major."""
    ys, xs = grid_bounds(hw[0], parts), grid_bounds(hw[1], parts)
    return [
        (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
        for i in range(parts)
        for j in range(parts)
    ]


def mean_std(x: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ``sqrt(unbiased var + eps)`` of ``(..., C, h, w)``."""
    flat = x.flatten(-2)
    # A one-cell patch (tiny grids) has no unbiased variance; call it 0.
    var = flat.var(-1, correction=1 if flat.shape[-1] > 1 else 0)
    return flat.mean(-1), (var + eps).sqrt()


def patch_statistics(features: torch.Tensor, parts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu, sigma`` of every patch: ``(B, parts², C)`` each."""
    stats = [
        mean_std(features[..., ys, xs]) for ys, xs in patch_regions(features.shape[-2:], parts)
    ]
    return torch.stack([m for m, _ in stats], 1), torch.stack([s for _, s in stats], 1)


def dominant_classes(
    labels: torch.Tensor,
    hw: tuple[int, int],
    stride: int,
    num_classes: int,
    parts: int = 3,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mode of the label pixels under each feature patch: ``(B, parts²)`` in ``0..K`` (K: ignore).

    Feature cell ``(i, j)`` covers label pixels ``[i*stride, (i+1)*stride)``; cells past the label
    (padding) and values outside ``0..K-1`` count as ignore. Ties go to the lower class, and a
    class beats ignore.
    """
    b = labels.shape[0]
    h_lab, w_lab = labels.shape[-2:]
    out = torch.full((b, parts * parts), num_classes, dtype=torch.long, device=labels.device)
    values = labels.long()
    values = torch.where((values >= 0) & (values < num_classes), values, num_classes)
    for p, (ys, xs) in enumerate(patch_regions(hw, parts)):
        y0, y1 = min(ys.start * stride, h_lab), min(ys.stop * stride, h_lab)
        x0, x1 = min(xs.start * stride, w_lab), min(xs.stop * stride, w_lab)
        if y1 <= y0 or x1 <= x0:
            continue
        region = values[:, y0:y1, x0:x1].reshape(b, -1)
        counts = F.one_hot(region, num_classes + 1).sum(1)  # (B, K + 1)
        out[:, p] = counts.argmax(1)
    return out


def restyle(
    features: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    parts: int = 3,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Give patch ``p`` of every image the statistics ``mu[:, p], sigma[:, p]`` (``(B, P, C)``)."""
    out = features.clone()
    for p, (ys, xs) in enumerate(patch_regions(features.shape[-2:], parts)):
        patch = features[..., ys, xs]
        m0, s0 = mean_std(patch)
        normed = (patch - m0[..., None, None]) / s0[..., None, None]
        out[..., ys, xs] = sigma[:, p, :, None, None] * normed + mu[:, p, :, None, None]
    return activation(out) if activation is not None else out


def mix_styles(
    features: torch.Tensor,
    mu_t: torch.Tensor,
    sigma_t: torch.Tensor,
    s: torch.Tensor,
    parts: int = 3,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """FAMix's local mixing: ``mu_mix = s mu + (1 - s) mu_t`` (same for sigma) per patch.

    Args:
        features: ``(B, C, h, w)``.
        mu_t, sigma_t: drawn target styles ``(B, parts², C)``.
        s: mixing weights ``(B, C)`` (``s = 1`` keeps the source style).
        activation: applied after restyling (ReLU for ResNet stage outputs).
    """
    mu, sigma = patch_statistics(features, parts)
    s = s[:, None, :]
    return restyle(
        features, s * mu + (1 - s) * mu_t, s * sigma + (1 - s) * sigma_t, parts, activation
    )
