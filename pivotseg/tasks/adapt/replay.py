"""Source replay for offline self-training (DAFormer / DACS): labelled source crops, target crops
of the same size, ClassMix and the student's colour jitter and blur.

Offline, the run's own source dataset (``data.source`` of its config.yaml) is at hand: each step
draws labelled source crops with the run's training pipeline (its crop, scales, flip and
photometric distortion, and its rare-class sampling when it trained with one), so the student
keeps the source task while it follows the target. Nothing here reads a target label.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pivotseg.data.loader import collate
from pivotseg.data.rare_classes import STATS_FILE, RareClassSampling
from pivotseg.data.transforms import resize_image, scaled_size
from pivotseg.engine.sampler import SeededItems, sample_seed
from pivotseg.errors import ConfigError, DataError
from pivotseg.heads.base import IGNORE_INDEX

JITTER_PROB, JITTER_STRENGTH = 0.2, 0.2  # DAFormer's colour jitter: p and s
BLUR_PROB, BLUR_SIGMA = 0.5, (0.15, 1.15)  # DACS's Gaussian blur: p and sigma range


class SourceReplay:
    """Labelled crops of the run's source dataset, in a seeded order, and same-size target crops.

    Args:
        run_cfg: the source run's :class:`~pivotseg.config.RunConfig`.
        seed: the draw order of source samples and their augmentations.
        work_dir: where rare-class pixel counts are cached (the new run's folder).
        stats_from: the source run folder, whose cached counts are copied when present.

    Raises:
        DataError: the source dataset is not readable at its configured path (one line naming
            it and ``--no-source-replay``).
    """

    def __init__(self, run_cfg, seed: int, work_dir: Path, stats_from: Path | None = None):
        from pivotseg.data import build_dataset
        from pivotseg.data.transforms import train_transforms_of

        data = run_cfg.data
        spec = data.source
        if spec is None:
            raise ConfigError(
                "source replay: the run's config.yaml names no data.source; adapt with "
                "--no-source-replay (source_replay=False)"
            )
        self.crop = _pair(data.crop_size)
        self.scales = list(data.scales) if data.scales else [max(self.crop)]
        transform = train_transforms_of(data, seed)
        try:
            dataset = build_dataset(
                spec.path, spec.format, spec.split, spec.domain, transform=transform,
                **spec.options,
            )  # fmt: skip
        except (DataError, ConfigError, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"source replay: cannot read the run's source data {spec.path} "
                f"({spec.format}, split {spec.split}): {first}; restore it there, or adapt "
                "without it with --no-source-replay (source_replay=False)"
            ) from None
        self.items = SeededItems(dataset)
        self.seed = seed
        self.position = 0
        self.classes = None
        if data.rare_class_sampling is not None:
            cache = Path(work_dir) / STATS_FILE
            if stats_from is not None and (Path(stats_from) / STATS_FILE).is_file():
                shutil.copyfile(Path(stats_from) / STATS_FILE, cache)
            rcs = data.rare_class_sampling
            self.classes = RareClassSampling.for_dataset(
                dataset, rcs.temperature, rcs.min_pixels, cache
            )
        self.size = len(dataset)

    def batch(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` labelled source crops: ``image (B, 3, h, w)`` 0-255, ``label (B, h, w)``."""
        items = []
        for _ in range(count):
            position = self.position
            self.position += 1
            seed = sample_seed(self.seed, position)
            if self.classes is not None:
                # The trailing 1 keeps this stream apart from the augmentation seed's, as the
                # trainer's ClassBalancedSampler does.
                index, cls = self.classes.draw(np.random.default_rng([self.seed, position, 1]))
                items.append(self.items[(index, position, seed, cls)])
            else:
                index = int(np.random.default_rng([self.seed, position, 2]).integers(self.size))
                items.append(self.items[(index, position, seed)])
        batch = collate(items)
        return batch["image"].float(), batch["label"]

    def target_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random crop of the source crop's size from ``image`` (uint8 ``(H, W, 3)``),
        resized first to a short side drawn from the run's scales that cover the crop (the
        source's own resize range), then flipped with probability 0.5."""
        ch, cw = self.crop
        covering = [s for s in self.scales if s >= max(ch, cw)] or [max(ch, cw)]
        short = int(covering[rng.integers(len(covering))])
        h, w = scaled_size(*image.shape[:2], short)
        # a thin image may still be narrower than the crop along its long side: scale it up
        factor = max(ch / h, cw / w, 1.0)
        h, w = math.ceil(h * factor), math.ceil(w * factor)
        image = resize_image(image, (h, w))
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = image[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return np.ascontiguousarray(crop)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def class_mix(
    source: torch.Tensor,
    source_label: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """ClassMix masks (DACS): for each image, ``(B, h, w)`` True on the pixels of a random half
    (rounded up) of the classes present in its source label; ignored pixels are never pasted."""
    masks = torch.zeros_like(source_label, dtype=torch.bool)
    for i in range(source.shape[0]):
        classes = source_label[i].unique()
        classes = classes[classes != IGNORE_INDEX]
        if classes.numel() == 0:
            continue
        keep = math.ceil(classes.numel() / 2)
        order = torch.randperm(classes.numel(), generator=generator)[:keep]
        masks[i] = torch.isin(source_label[i], classes[order.to(classes.device)])
    return masks


def strong_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DAFormer's student-side augmentation of 0-255 images ``(B, 3, h, w)``: with p = 0.2 a
    colour jitter (brightness, contrast, saturation by factors in [0.8, 1.2]; hue is left out:
    no torchvision here), and with p = 0.5 a Gaussian blur (sigma in [0.15, 1.15], kernel a
    tenth of the short side, as DACS)."""
    out = []
    for image in images:
        if float(torch.rand((), generator=generator)) < JITTER_PROB:
            image = _jitter(image, generator)
        if float(torch.rand((), generator=generator)) < BLUR_PROB:
            low, high = BLUR_SIGMA
            sigma = low + (high - low) * float(torch.rand((), generator=generator))
            image = gaussian_blur(image, sigma, _odd(0.1 * min(image.shape[-2:])))
        out.append(image.clamp(0, 255))
    return torch.stack(out)


def _factor(generator: torch.Generator) -> float:
    s = JITTER_STRENGTH
    return 1.0 - s + 2 * s * float(torch.rand((), generator=generator))


def _jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    grey = (image * image.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    image = image * _factor(generator)  # brightness
    image = (image - grey.mean()) * _factor(generator) + grey.mean()  # contrast
    return (image - grey) * _factor(generator) + grey  # saturation


def _odd(value: float) -> int:
    size = max(3, int(math.ceil(value)))
    return size if size % 2 else size + 1


def gaussian_blur(image: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Separable Gaussian blur of ``(3, h, w)`` with reflect padding."""
    x = torch.arange(size, dtype=image.dtype, device=image.device) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad = size // 2
    out = image[None]
    out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(
        3, 1, 1, size), groups=3)  # fmt: skip
    out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1).expand(
        3, 1, size, 1), groups=3)  # fmt: skip
    return out[0]
