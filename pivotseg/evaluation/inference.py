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


def rescale_images(images: torch.Tensor, scale: float, min_side: int = 1) -> torch.Tensor:
    """``images`` resized by ``scale`` (bilinear), neither side below ``min_side`` (the smallest
    input the model takes: a small image's 0.75 view would not pass its coarsest level)."""
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    if min(int(h * scale), int(w * scale)) >= min_side:
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    size = (max(int(h * scale), min_side), max(int(w * scale), min_side))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def augmented_probabilities(
    fn: LogitsFn,
    images: torch.Tensor,
    scales=(1.0,),
    flip: bool = True,
    min_side: int = 1,
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of ``fn`` averaged over ``images`` at every scale, each view also flipped
    horizontally when ``flip`` (mmseg's multi-scale + flip test), every view brought back to
    the images' size: ``(B, K, H, W)``. ``plain``: the softmax of the images as they are, if
    already computed (used when 1 is among the scales).
    """
    size = images.shape[-2:]

    def view(scale: float, flipped: bool) -> torch.Tensor:
        x = rescale_images(images, scale, min_side)
        probs = F.softmax(fn(x.flip(-1) if flipped else x).float(), dim=1)
        return resize_logits(probs.flip(-1) if flipped else probs, size)

    scales = [float(s) for s in scales]
    views = []
    if 1.0 in scales:
        views.append(plain if plain is not None else view(1.0, False))
    for scale in scales:
        for flipped in (False, True) if flip else (False,):
            if scale != 1.0 or flipped:
                views.append(view(scale, flipped))
    return torch.stack(views).mean(0)
