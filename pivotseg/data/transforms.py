"""Training and evaluation transforms with mmsegmentation's DGSS recipe semantics.

Transforms are callables on the item dict ``{"image": uint8 (H, W, 3), "label": int64 (H, W),
"meta": {...}}``; random ones take a ``numpy.random.Generator``. :class:`Compose` makes one
generator per item from ``(seed, epoch, index)`` (``meta["epoch"]``, ``meta["index"]``, set by
:class:`~pivotseg.data.dataset.SegDataset`), so the same seed gives the same sample whatever
the DataLoader's workers, and :meth:`SegDataset.set_epoch` moves every item to fresh draws. With
``seed=None`` each call draws fresh OS entropy.

The recipe (Rein's ``rein_dinov2_mask2former_512x512`` config, methods.md §1):
``RandomChoiceResize`` (short edge from ``scales``, keep ratio, long edge <= ``max_size``) ->
``RandomCrop`` (``cat_max_ratio`` 0.75) -> ``RandomFlip`` (0.5) -> ``PhotoMetricDistortion`` ->
``Pad`` to the crop size (image 0, label 255) -> ``ToTensor``.

Differences from mmcv, all small: images are resized with Pillow's bilinear filter, which
antialiases when shrinking (OpenCV's does not); saturation and hue are changed in one round trip
through Pillow's 8-bit HSV (hue in 256 steps) instead of two through OpenCV's 8-bit HSV (hue in
180 steps). The random ranges are mmseg's: saturation factor in [0.5, 1.5], hue shift an
integer in [-18, 17] OpenCV units of 2 degrees (rounded to the nearest Pillow step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from pivotseg.data.taxonomy import IGNORE_INDEX

Item = dict


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``(H, W, 3)`` image to ``size = (h, w)``."""
    if image.shape[:2] == tuple(size):
        return image
    pil = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel-centre aligned, any integer dtype)."""
    h, w = label.shape[:2]
    if (h, w) == tuple(size):
        return label
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def scaled_size(h: int, w: int, short: int, max_long: int | None = None) -> tuple[int, int]:
    """Size after scaling the short edge to ``short``, capped so the long edge <= ``max_long``.

    Same rounding as mmcv's ``rescale_size`` (``int(x * factor + 0.5)``).
    """
    factor = short / min(h, w)
    if max_long is not None:
        factor = min(factor, max_long / max(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


class Compose:
    """Apply transforms in order, giving random ones a per-item generator.

    Args:
        transforms: callables ``t(item)`` or, when ``t.random`` is true, ``t(item, rng)``.
        seed: base seed; the generator of an item is ``default_rng([seed, epoch, index])``.
    """

    def __init__(self, transforms: Sequence[Callable], seed: int | None = None):
        self.transforms = list(transforms)
        self.seed = seed

    def generator(self, item: Item) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        meta = item.get("meta", {})
        return np.random.default_rng([self.seed, meta.get("epoch", 0), meta.get("index", 0)])

    def __call__(self, item: Item) -> Item:
        rng = self.generator(item)
        for t in self.transforms:
            item = t(item, rng) if getattr(t, "random", False) else t(item)
        return item

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}], seed={self.seed})"


class RandomChoiceResize:
    """Resize so the short edge is one of ``scales`` (chosen uniformly), keeping the ratio.

    mmseg's ``RandomChoiceResize(resize_type="ResizeShortestEdge", max_size=...)``: the long
    edge is capped at ``max_size``. Image bilinear, label nearest.
    """

    random = True

    def __init__(self, scales: Sequence[int], max_size: int | None = 2048):
        self.scales = [int(s) for s in scales]
        self.max_size = max_size

    def __call__(self, item: Item, rng: np.random.Generator) -> Item:
        short = self.scales[int(rng.integers(len(self.scales)))]
        return ResizeShortEdge(short, self.max_size)(item)

    def __repr__(self) -> str:
        return f"RandomChoiceResize({self.scales}, max_size={self.max_size})"


class ResizeShortEdge:
    """Deterministic keep-ratio resize (short edge ``short``, long edge <= ``max_long``).

    Args:
        resize_label: also resize the label (training); evaluation keeps the original label and
            scores logits resized back to it, as mmseg does.
    """

    def __init__(self, short: int, max_long: int | None = None, resize_label: bool = True):
        self.short, self.max_long, self.resize_label = short, max_long, resize_label

    def __call__(self, item: Item) -> Item:
        h, w = item["image"].shape[:2]
        size = scaled_size(h, w, self.short, self.max_long)
        item["image"] = resize_image(item["image"], size)
        if self.resize_label and "label" in item:
            item["label"] = resize_label(item["label"], size)
        return item

    def __repr__(self) -> str:
        return f"ResizeShortEdge({self.short}, max_long={self.max_long})"


class CropFitCheck:
    """Warn once when the crop is larger than an image even after the largest training resize.

    Such crops are mostly padding: memory and time go to pixels that are ignored (a 2048 crop on
    480x360 CamVid frames costs gigabytes per batch). Placed before the resize; changes nothing.
    Each DataLoader worker holds its own copy, so each may warn once.
    """

    def __init__(self, crop_size: int | Sequence[int], scales: Sequence[int], max_size: int | None):
        self.crop = _pair(crop_size)
        self.largest = max(int(s) for s in scales)
        self.max_size = max_size
        self.warned = False

    def __call__(self, item: Item) -> Item:
        if self.warned:
            return item
        h, w = item["image"].shape[:2]
        rh, rw = scaled_size(h, w, self.largest, self.max_size)
        if rh < self.crop[0] or rw < self.crop[1]:
            self.warned = True
            name = item.get("meta", {}).get("path", "a training image")
            warnings.warn(
                f"data.crop_size {list(self.crop)} is larger than the training images: {name} is "
                f"{h}x{w} and at most {rh}x{rw} after resizing (data.scales up to "
                f"{self.largest}, data.max_size {self.max_size}; sizes are height x width), so "
                "every crop is mostly padding and costs memory and time for nothing; lower "
                f"data.crop_size to at most [{min(rh, self.crop[0])}, {min(rw, self.crop[1])}] "
                "or raise data.scales",
                stacklevel=2,
            )
        return item

    def __repr__(self) -> str:
        return f"CropFitCheck({self.crop}, largest scale {self.largest}, max_size={self.max_size})"


class RandomCrop:
    """Random crop; with ``cat_max_ratio < 1`` re-draw until no class fills too much of it.

    mmseg semantics: the first window is checked and up to 10 re-draws are made; a window passes
    when it holds at least two classes (255 not counted) and the largest has a share of the
    labelled pixels below ``cat_max_ratio``; after 10 failed checks the last window drawn is
    used. An image smaller than the crop is cropped to its own size (``Pad`` fills up later).

    Class-aware crops (rare-class sampling, :mod:`pivotseg.data.rare_classes`): when
    ``meta["crop_class"]`` names a class present in the label, every candidate window is drawn
    around a random pixel of that class (uniformly among the windows holding that pixel), so the
    crop contains the class; the ``cat_max_ratio`` rule then chooses among such candidates.
    """

    random = True

    def __init__(
        self, size: int | Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255
    ):
        self.size = _pair(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        ch, cw = self.size
        top = int(rng.integers(max(h - ch, 0) + 1))
        left = int(rng.integers(max(w - cw, 0) + 1))
        return top, min(top + ch, h), left, min(left + cw, w)

    def _balanced(self, label: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        y0, y1, x0, x1 = box
        counts = np.bincount(label[y0:y1, x0:x1].ravel())  # labels are small non-negative ids
        if self.ignore_index < len(counts):
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def _window_around(
        self, h: int, w: int, pixels: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        ch, cw = self.size
        pick = int(rng.integers(len(pixels[0])))
        y, x = int(pixels[0][pick]), int(pixels[1][pick])
        top = int(rng.integers(max(0, y - ch + 1), min(y, max(h - ch, 0)) + 1))
        left = int(rng.integers(max(0, x - cw + 1), min(x, max(w - cw, 0)) + 1))
        return top, min(top + ch, h), left, min(left + cw, w)

    def _window_drawer(self, item: Item, h: int, w: int, rng: np.random.Generator):
        focus = item.get("meta", {}).get("crop_class")
        if focus is not None and "label" in item:
            pixels = np.nonzero(item["label"] == focus)
            if len(pixels[0]):  # a resize can drop a tiny object: then crop as usual
                return lambda: self._window_around(h, w, pixels, rng)
        return lambda: self._window(h, w, rng)

    def __call__(self, item: Item, rng: np.random.Generator) -> Item:
        h, w = item["image"].shape[:2]
        draw = self._window_drawer(item, h, w, rng)
        box = draw()
        if self.cat_max_ratio < 1.0 and "label" in item:
            for _ in range(10):
                if self._balanced(item["label"], box):
                    break
                box = draw()
        y0, y1, x0, x1 = box
        item["image"] = item["image"][y0:y1, x0:x1]
        if "label" in item:
            item["label"] = item["label"][y0:y1, x0:x1]
        return item

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    random = True

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, item: Item, rng: np.random.Generator) -> Item:
        if rng.random() < self.prob:
            item["image"] = item["image"][:, ::-1]
            if "label" in item:
                item["label"] = item["label"][:, ::-1]
        return item

    def __repr__(self) -> str:
        return f"RandomFlip({self.prob})"


def adjust_saturation_hue(
    image: np.ndarray, saturation: float | None = None, hue: int | None = None
) -> np.ndarray:
    """Scale saturation and/or rotate hue of a uint8 RGB image through 8-bit HSV.

    Like mmcv, which uses OpenCV's 8-bit HSV (hue in 180 steps of 2 degrees), this goes through
    Pillow's 8-bit HSV (hue in 256 steps); one round trip serves both changes.

    Args:
        image: ``uint8 (H, W, 3)``.
        saturation: factor on S (clipped to 255), or None.
        hue: shift in OpenCV hue units (2 degrees each), or None.
    """
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    if saturation is not None:
        hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(saturation), 0, 255).astype(np.uint8)
    if hue is not None:
        shift = round(hue * 2 * 256 / 360)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion: brightness, contrast, saturation, hue, each with p = 0.5.

    Order: brightness (add U(-32, 32)); contrast first or last (a fair coin decides; multiply by
    U(0.5, 1.5)); saturation (multiply by U(0.5, 1.5)); hue (shift by an integer in [-18, 17]
    OpenCV units, 2 degrees each). Every step clips to [0, 255] and truncates to uint8.
    """

    random = True

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def __call__(self, item: Item, rng: np.random.Generator) -> Item:
        img = item["image"]
        if rng.integers(2):
            img = self._convert(
                img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta)
            )
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            img = self._convert(img, alpha=rng.uniform(*self.contrast_range))
        saturation = rng.uniform(*self.saturation_range) if rng.integers(2) else None
        hue = int(rng.integers(-self.hue_delta, self.hue_delta)) if rng.integers(2) else None
        if saturation is not None or hue is not None:
            img = adjust_saturation_hue(np.ascontiguousarray(img), saturation, hue)
        if not contrast_first and rng.integers(2):
            img = self._convert(img, alpha=rng.uniform(*self.contrast_range))
        item["image"] = img
        return item

    def __repr__(self) -> str:
        return "PhotoMetricDistortion()"


class Pad:
    """Pad bottom/right up to ``size`` (image with 0, label with 255); larger inputs unchanged."""

    def __init__(self, size: int | Sequence[int], pad_value: int = 0, label_pad: int = 255):
        self.size = _pair(size)
        self.pad_value, self.label_pad = pad_value, label_pad

    def __call__(self, item: Item) -> Item:
        h, w = item["image"].shape[:2]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            item["image"] = np.pad(
                item["image"], ((0, ph), (0, pw), (0, 0)), constant_values=self.pad_value
            )
            if "label" in item:
                item["label"] = np.pad(
                    item["label"], ((0, ph), (0, pw)), constant_values=self.label_pad
                )
        return item

    def __repr__(self) -> str:
        return f"Pad({self.size})"


class ToTensor:
    """``image`` -> float32 ``(3, H, W)`` on the 0-255 scale; ``label`` -> int64 ``(H, W)``."""

    def __call__(self, item: Item) -> Item:
        image = np.ascontiguousarray(item["image"].transpose(2, 0, 1), dtype=np.float32)
        item["image"] = torch.from_numpy(image)
        if "label" in item:
            item["label"] = torch.from_numpy(np.ascontiguousarray(item["label"], dtype=np.int64))
        return item

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """``(x - mean) / std`` per channel, for feeding a backbone directly (0-255 statistics).

    Works on a ``(3, H, W)`` tensor (after :class:`ToTensor`) or an ``(H, W, 3)`` array.
    Defaults are ImageNet's. The :class:`~pivotseg.segmenter.Segmenter` normalises by itself;
    do not use both.
    """

    def __init__(
        self,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
    ):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, item: Item) -> Item:
        image = item["image"]
        if isinstance(image, torch.Tensor):
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            item["image"] = (image.float() - mean) / std
        else:
            item["image"] = (image.astype(np.float32) - np.float32(self.mean)) / np.float32(
                self.std
            )
        return item

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def default_scales(crop_size: int | Sequence[int]) -> list[int]:
    """Rein's short-edge scales: ``int(crop * r)`` for r = 0.5, 0.6, ..., 2.0 (crop = long side).

    For a 512 crop: 256, 307, 358, ..., 972, 1024.
    """
    crop = max(_pair(crop_size))
    return [int(crop * x * 0.1) for x in range(5, 21)]


def train_transforms(
    crop_size: int | Sequence[int],
    scales: Sequence[int] | None = None,
    cat_max_ratio: float = 0.75,
    flip: bool = True,
    photometric: bool = True,
    seed: int | None = None,
    max_size: int | None = 2048,
) -> Compose:
    """The DGSS training pipeline (see the module docstring).

    Args:
        crop_size: crop ``int`` or ``(h, w)``.
        scales: short-edge sizes; default :func:`default_scales` of the crop.
        cat_max_ratio: largest share one class may take of a crop (1 disables the check).
        flip: random horizontal flip.
        photometric: :class:`PhotoMetricDistortion`.
        seed: base seed of the per-item generators (``None``: not reproducible).
        max_size: cap on the long edge after resizing.
    """
    scales = scales or default_scales(crop_size)
    steps: list[Callable] = [
        CropFitCheck(crop_size, scales, max_size),
        RandomChoiceResize(scales, max_size),
        RandomCrop(crop_size, cat_max_ratio),
    ]
    if flip:
        steps.append(RandomFlip(0.5))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Pad(crop_size, 0, IGNORE_INDEX), ToTensor()]
    return Compose(steps, seed=seed)


def train_transforms_of(data, seed: int | None) -> Compose:
    """:func:`train_transforms` with the settings of a config's ``data`` section
    (:class:`~pivotseg.config.DataConfig`), as training and source replay both build it."""
    return train_transforms(
        data.crop_size,
        scales=data.scales,
        cat_max_ratio=data.cat_max_ratio,
        flip=data.flip,
        photometric=data.photometric,
        seed=seed,
        max_size=data.max_size,
    )


def eval_transforms(resize_short: int | None = None, max_long: int | None = None) -> Compose:
    """Evaluation pipeline: optional keep-ratio resize of the *image*, then :class:`ToTensor`.

    The label stays at its original size (``meta["size"]``); score logits resized back to it,
    as mmseg does (e.g. Cityscapes val: ``resize_short=512`` gives 1024x512 inputs).
    """
    steps: list[Callable] = []
    if resize_short is not None:
        steps.append(ResizeShortEdge(resize_short, max_long, resize_label=False))
    steps.append(ToTensor())
    return Compose(steps)
