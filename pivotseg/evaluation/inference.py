"""Whole-image and sliding-window inference around any ``images -> logits`` function."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, K, h, w)`` logits to ``size`` (no-op when already there)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def whole_inference(
    fn: LogitsFn, images: torch.Tensor, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """``fn(images)``, optionally resized to ``out_size`` (the label size).

    Args:
        fn: maps ``(B, 3, H, W)`` images to ``(B, K, H, W)`` logits.
        images: the batch.
        out_size: ``(H, W)`` to resize the logits to, e.g. ``meta["size"]``.
    """
    logits = fn(images)
    return resize_logits(logits, out_size) if out_size is not None else logits


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``length`` (mmseg's grid: the last window is flush with the end)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(count)})


@torch.no_grad()
def slide_inference(
    fn: LogitsFn,
    images: torch.Tensor,
    num_classes: int,
    crop: int | tuple[int, int],
    stride: int | tuple[int, int],
    batch_size: int = 4,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Sliding-window logits: overlapping crops, batched through ``fn``, overlaps averaged.

    Windows follow mmseg's ``slide_inference`` grid (e.g. 512 crop / 341 stride). A window that
    reaches past a smaller image is zero-padded to the crop size before ``fn`` and only its valid
    part is kept, so ``fn`` always sees ``crop``-sized inputs. A count map divides the summed
    logits.

    Args:
        fn: maps ``(N, 3, h, w)`` crops to ``(N, K, h, w)`` logits.
        images: ``(B, 3, H, W)``.
        num_classes: K.
        crop: window ``(h, w)``.
        stride: step ``(h, w)``.
        batch_size: windows per call of ``fn``.
        out_size: optional ``(H, W)`` to resize the result to.

    Returns:
        ``(B, K, H, W)`` logits (or ``out_size``).
    """
    ch, cw = _pair(crop)
    sh, sw = _pair(stride)
    b, _, h, w = images.shape
    windows = [
        (i, y, x)
        for i in range(b)
        for y in window_starts(h, ch, sh)
        for x in window_starts(w, cw, sw)
    ]
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((b, 1, h, w), dtype=torch.float32)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        crops = images.new_zeros((len(chunk), images.shape[1], ch, cw))
        for j, (i, y, x) in enumerate(chunk):
            patch = images[i, :, y : y + ch, x : x + cw]
            crops[j, :, : patch.shape[1], : patch.shape[2]] = patch
        out = fn(crops)
        if out.shape[1] != num_classes or tuple(out.shape[-2:]) != (ch, cw):
            raise ValueError(
                f"slide_inference: fn returned {tuple(out.shape)}, expected "
                f"(N, {num_classes}, {ch}, {cw}); fn must return logits at its input size"
            )
        for j, (i, y, x) in enumerate(chunk):
            vh, vw = min(ch, h - y), min(cw, w - x)
            logits[i, :, y : y + vh, x : x + vw] += out[j, :, :vh, :vw].float()
            count[i, :, y : y + vh, x : x + vw] += 1
    logits = logits / count
    return resize_logits(logits, out_size) if out_size is not None else logits
