"""Set pivots for DPFT: class-wise feature anchors kept as an EMA over the training set.

Pieces (methods.md section 2, "Set pivots" and "Loss"; the design is ours, marked [P] there):

* :func:`patch_classes`: the class of each token of a ``(h, w)`` grid: class ``k`` when at
  least half of the token's ``stride x stride`` pixels are labelled ``k`` (ignored pixels count
  in the area, so a half-ignored patch can still qualify), else -1.
* :func:`class_pool`: per-image class sums and counts of token features.
* :class:`PivotBank`: the non-learnable ``(K, C)`` pivots plus a ``valid`` mask (classes seen
  at least once); the first observation of a class sets its pivot, later ones update it by EMA.
* :func:`pivot_info_nce`: InfoNCE between class-pooled features and the valid pivots.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def patch_classes(
    labels: torch.Tensor,
    grid: tuple[int, int],
    stride: int,
    num_classes: int,
    ignore_index: int = 255,
    min_fraction: float = 0.5,
) -> torch.Tensor:
    """Class of each token (``(B, h*w)`` int64, -1 where no class covers ``min_fraction``).

    Args:
        labels: ``(B, H, W)`` int labels; ``H <= h * stride`` (labels of an image the segmenter
            padded bottom/right are padded here with ``ignore_index`` the same way).
        grid: token grid ``(h, w)``.
        stride: pixels per token side.
        num_classes: K; label values outside ``[0, K)`` count as ignored.
    """
    b, height, width = labels.shape
    h, w = grid
    if height > h * stride or width > w * stride:
        raise ValueError(
            f"labels {height}x{width} are larger than the {h}x{w} token grid at stride {stride}"
        )
    labels = F.pad(labels, (0, w * stride - width, 0, h * stride - height), value=ignore_index)
    rows = torch.arange(h * stride, device=labels.device) // stride
    cols = torch.arange(w * stride, device=labels.device) // stride
    patch = (rows[:, None] * w + cols[None, :]).expand(b, -1, -1)
    image = torch.arange(b, device=labels.device)[:, None, None]
    valid = (labels >= 0) & (labels < num_classes)
    index = ((image * (h * w) + patch) * num_classes + labels.clamp(0, num_classes - 1))[valid]
    counts = torch.bincount(index, minlength=b * h * w * num_classes).view(b, h * w, num_classes)
    best, cls = counts.max(-1)
    cls[(best == 0) | (best < min_fraction * stride * stride)] = -1
    return cls


def class_pool(
    tokens: torch.Tensor, classes: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image class sums ``(B, K, C)`` and token counts ``(B, K)`` of ``tokens (B, N, C)``."""
    member = (classes[..., None] == torch.arange(num_classes, device=classes.device)).to(
        tokens.dtype
    )
    return member.transpose(1, 2) @ tokens, member.sum(1)


def pivot_info_nce(
    anchors: torch.Tensor,
    anchor_classes: torch.Tensor,
    pivots: torch.Tensor,
    valid: torch.Tensor,
    tau: float = 0.1,
) -> torch.Tensor:
    """Mean over anchors of ``-log softmax_k(cos(a, P_k) / tau)[class(a)]`` over valid pivots.

    Anchors whose class has no valid pivot are skipped; with none left the result is a zero
    that still belongs to the graph of ``anchors``.
    """
    keep = valid[anchor_classes]
    if not keep.any():
        return anchors.sum() * 0.0
    anchors, anchor_classes = anchors[keep], anchor_classes[keep]
    logits = F.normalize(anchors.float(), dim=-1) @ F.normalize(pivots.float(), dim=-1).T / tau
    logits = logits.masked_fill(~valid[None, :], float("-inf"))
    return F.cross_entropy(logits, anchor_classes)


class PivotBank(nn.Module):
    """``(K, C)`` pivots (buffers, saved with the model) and which of them hold data yet.

    Args:
        num_classes: K.
        dim: feature width C.
        momentum: EMA momentum m: ``P <- m P + (1 - m) batch_mean``.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("pivots", torch.zeros(num_classes, dim))
        self.register_buffer("valid", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA step with class sums ``(K, C)`` and counts ``(K,)`` of one batch.

        Under torch.distributed the sums and counts are added over processes first, so every
        process keeps the same pivots.
        """
        sums, counts = sums.detach().float().clone(), counts.detach().float().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        seen = counts > 0
        mean = sums / counts.clamp_min(1)[:, None]
        m = self.momentum
        ema = torch.where(self.valid[:, None], m * self.pivots + (1 - m) * mean, mean)
        self.pivots.copy_(torch.where(seen[:, None], ema, self.pivots))
        self.valid |= seen

    @torch.no_grad()
    def set_means(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Set the pivots of the classes with ``counts > 0`` to ``sums / counts`` (warm-up)."""
        seen = counts > 0
        mean = sums.float() / counts.float().clamp_min(1)[:, None]
        self.pivots.copy_(torch.where(seen[:, None], mean, self.pivots))
        self.valid |= seen
