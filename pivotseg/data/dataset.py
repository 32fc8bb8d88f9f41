"""The torch dataset every reader returns (its pairs and label decoder: ``listing.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pivotseg.data.io import read_image
from pivotseg.data.listing import LabelDecoder, Listing, Sample
from pivotseg.data.taxonomy import Color
from pivotseg.errors import DataError

__all__ = ["LabelDecoder", "Listing", "Sample", "SegDataset"]


class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs of one dataset, read on demand.

    ``dataset[i]`` is ``dict(image=uint8 (H, W, 3) RGB, label=int64 (H, W) with 255 = ignore,
    meta=dict(path, label_path, size=(H, W), domain, split, index, epoch))``, passed through
    ``transform`` when one is set (random transforms draw from a generator seeded by the
    transform's seed, ``epoch`` and ``index``; call :meth:`set_epoch` at each pass).

    Args:
        samples: the pairs to read.
        classes: class names, index = training id.
        palette: one RGB colour per class.
        domain: name of the data domain (defaults to the format name in ``build_dataset``).
        decode_label: ``path -> int64 (H, W)`` training ids (reads and maps the raw file).
        transform: callable on the item dict.
        format_name: the reader that produced the samples.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        palette: Sequence[Color],
        domain: str,
        decode_label: Callable[[Path], np.ndarray],
        transform: Callable[[dict], dict] | None = None,
        format_name: str = "",
    ):
        self.samples = list(samples)
        self.classes = list(classes)
        self.palette = [tuple(int(v) for v in c) for c in palette]
        self.domain = domain
        self.decode_label = decode_label
        self.transform = transform
        self.format_name = format_name
        self.epoch = 0
        self.crop_class: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Change the random stream of seeded transforms (like ``DistributedSampler``)."""
        self.epoch = int(epoch)

    def set_crop_class(self, crop_class: int | None) -> None:
        """Class the next item's crop must contain (rare-class sampling); ``None``: any."""
        self.crop_class = None if crop_class is None else int(crop_class)

    def load_label(self, index: int) -> np.ndarray:
        """Training ids of sample ``index`` without reading its image."""
        return self.decode_label(self.samples[index].label)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_image(sample.image)
        label = self.decode_label(sample.label)
        if image.shape[:2] != label.shape[:2]:
            raise DataError(
                f"{sample.label}: label is {label.shape[1]}x{label.shape[0]} but its image "
                f"{sample.image} is {image.shape[1]}x{image.shape[0]}; re-export the pair or "
                "remove it"
            )
        item = {
            "image": image,
            "label": label,
            "meta": {
                "path": str(sample.image),
                "label_path": str(sample.label),
                "size": (int(image.shape[0]), int(image.shape[1])),
                "domain": sample.domain or self.domain,
                "split": sample.split,
                "index": int(index),
                "epoch": self.epoch,
            },
        }
        if self.crop_class is not None:
            item["meta"]["crop_class"] = self.crop_class
        if self.transform is not None:
            item = self.transform(item)
        return item

    def __repr__(self) -> str:
        return (
            f"SegDataset({self.format_name or 'custom'}, domain={self.domain!r}, "
            f"{len(self)} samples, {self.num_classes} classes)"
        )
