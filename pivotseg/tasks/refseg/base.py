"""What every reference-segmentation method shares: the interface and input checks.

A method is fitted on ``k`` reference images with their object masks, then segments the same
object (or concept) in target images::

    method = PerSAM(predictor).fit([ref_image], [ref_mask])
    mask, score = method.segment(target_image)   # bool (H, W), float

``segment`` never fails because the object is absent: it returns an empty mask and a score of
0 (or the method's low confidence) instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pivotseg.errors import DataError
from pivotseg.tasks.refseg.images import validate_mask
from pivotseg.tasks.refseg.predictor import check_image


class ReferenceSegmenter:
    """Base class: ``fit(ref_images, ref_masks) -> self``, ``segment(image) -> (mask, score)``."""

    name: str = ""

    def fit(self, ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]):
        raise NotImplementedError

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        raise NotImplementedError


def check_references(
    ref_images: Sequence[np.ndarray], ref_masks: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of (uint8 RGB image, bool mask), or a DataError naming the reference."""
    if len(ref_images) == 0:
        raise DataError("no reference image given; pass at least one image with its mask")
    if len(ref_images) != len(ref_masks):
        raise DataError(f"{len(ref_images)} reference images but {len(ref_masks)} masks")
    pairs = []
    for i, (image, mask) in enumerate(zip(ref_images, ref_masks)):
        try:
            image = check_image(image)
        except ValueError as err:
            raise DataError(f"reference #{i}: {err}") from None
        pairs.append((image, validate_mask(mask, image.shape[:2], name=f"reference #{i}")))
    return pairs


def empty_mask(image: np.ndarray) -> np.ndarray:
    return np.zeros(image.shape[:2], dtype=bool)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """x0, y0, x1, y1 of the mask's pixels, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def object_cells(coverage: torch.Tensor) -> torch.Tensor:
    """Boolean grid of the cells an object covers: at least half, else the best-covered ones.

    The fallback keeps objects smaller than one embedding cell usable as references.
    """
    cells = coverage >= 0.5
    if not cells.any():
        cells = coverage >= coverage.max() - 1e-6
    return cells


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the histogram split that maximises the between-class variance."""
    v = values.detach().flatten().float()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return hi
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0)
    mu0 = m0 / w0.clamp(min=1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(between[:-1].argmax())
    # Threshold at the upper edge of bin k: values above it form the foreground class.
    return lo + (k + 1) * (hi - lo) / bins
