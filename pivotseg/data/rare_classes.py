"""Rare-class sampling (RCS, DAFormer: Hoyer et al., CVPR 2022) for a labelled training set.

Every training sample starts from a class: ``c`` is drawn with

    P(c) = exp((1 - f_c) / T) / sum_k exp((1 - f_k) / T)

where ``f_c`` is the share of the source set's labelled pixels (255 not counted) that belong to
``c`` and ``T`` the temperature (DAFormer: 0.01; larger ``T`` flattens towards uniform over
classes). An image is then drawn uniformly among those holding more than ``min_pixels`` pixels
of ``c`` (at the label files' resolution), and the training crop is taken around a pixel of
``c`` (:class:`pivotseg.data.transforms.RandomCrop`), so the sampled class is in the crop.
Classes absent from the source set are never drawn; a class present only below ``min_pixels``
is drawn among the images that hold it at all.

Pixel counts are read once per source set (labels only, no images) and kept as JSON, in the
run folder for a training run, so a resumed run draws from the same counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pivotseg.data.taxonomy import IGNORE_INDEX
from pivotseg.errors import ConfigError, DataError

STATS_FILE = "class_stats.json"


def class_pixel_counts(dataset) -> np.ndarray:
    """``(images, classes)`` labelled pixels per class of every image of a :class:`SegDataset`."""
    if not hasattr(dataset, "load_label"):
        raise ConfigError(
            f"data.rare_class_sampling: {type(dataset).__name__} cannot read labels apart from "
            "images (no load_label); use a dataset built by pivotseg.data.build_dataset or "
            "remove data.rare_class_sampling"
        )
    num_classes = len(dataset.classes)
    counts = np.zeros((len(dataset), num_classes), dtype=np.int64)
    for index in range(len(dataset)):
        label = np.asarray(dataset.load_label(index))
        ids = label[label != IGNORE_INDEX].ravel()
        counts[index] = np.bincount(ids, minlength=num_classes)[:num_classes]
    return counts


def _label_files(dataset) -> list[str]:
    return [str(s.label) for s in getattr(dataset, "samples", [])]


def load_or_count(dataset, path: str | Path) -> np.ndarray:
    """Pixel counts of ``dataset`` from ``path`` if it holds this dataset's, else counted and
    written there (JSON: classes, label files, counts)."""
    path = Path(path)
    files, classes = _label_files(dataset), list(dataset.classes)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(
                f"{path}: not valid JSON; delete it and the class statistics are counted again"
            ) from None
        if saved.get("classes") == classes and saved.get("label_files") == files:
            return np.asarray(saved["counts"], dtype=np.int64).reshape(len(files), len(classes))
    counts = class_pixel_counts(dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"classes": classes, "label_files": files, "counts": counts.tolist()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes may count at once
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return counts


def class_probabilities(counts: np.ndarray, temperature: float) -> np.ndarray:
    """RCS's ``P(c)`` per class (0 for classes without a labelled pixel)."""
    totals = counts.sum(0).astype(np.float64)
    if totals.sum() == 0:
        raise DataError("data.rare_class_sampling: the source labels hold no labelled pixel")
    freq = totals / totals.sum()
    logits = np.where(totals > 0, (1.0 - freq) / temperature, -np.inf)
    logits -= logits[totals > 0].max()  # exp of (1 - f) / 0.01 overflows without the shift
    weights = np.exp(logits)
    return weights / weights.sum()


def median_frequency_weights(counts: np.ndarray, power: float = 1.0) -> list[float]:
    """Per-class loss weights ``(median_k f_k / f_c) ** power`` (median-frequency balancing,
    Eigen & Fergus 2015, SegNet's CamVid recipe; ``power`` 0.5 is a milder variant), rounded to
    3 decimals for configs. Classes without a labelled pixel get 1 (they never enter the loss).
    """
    totals = np.asarray(counts, dtype=np.float64).reshape(-1, np.shape(counts)[-1]).sum(0)
    present = totals > 0
    if not present.any():
        raise DataError("class weights: the source labels hold no labelled pixel")
    freq = totals / totals.sum()
    weights = np.ones_like(freq)
    weights[present] = (np.median(freq[present]) / freq[present]) ** power
    return [round(float(w), 3) for w in weights]


class RareClassSampling:
    """Draws ``(image index, class)`` pairs as RCS prescribes.

    Args:
        counts: ``(images, classes)`` labelled pixels (:func:`class_pixel_counts`).
        temperature: ``T`` of the class distribution.
        min_pixels: an image is drawn for class ``c`` when it holds more than this many pixels
            of ``c`` (DAFormer's 3000 is for 2-megapixel GTA5 labels).
    """

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.probs = class_probabilities(self.counts, temperature)
        self.classes = np.flatnonzero(self.probs > 0)
        self.images: dict[int, np.ndarray] = {}
        for c in self.classes:
            column = self.counts[:, c]
            enough = np.flatnonzero(column > min_pixels)
            self.images[int(c)] = enough if len(enough) else np.flatnonzero(column > 0)
        self._class_probs = self.probs[self.classes]

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """One ``(image index, class)`` from ``rng``."""
        c = int(self.classes[rng.choice(len(self.classes), p=self._class_probs)])
        candidates = self.images[c]
        return int(candidates[rng.integers(len(candidates))]), c

    @classmethod
    def for_dataset(
        cls, dataset, temperature: float, min_pixels: int, cache: str | Path
    ) -> RareClassSampling:
        """Counts from ``cache`` (written on first use) for ``dataset``."""
        return cls(load_or_count(dataset, cache), temperature, min_pixels)


def rare_class_sampling(dataset, settings, run_dir: str | Path) -> RareClassSampling | None:
    """The sampling ``settings`` (``data.rare_class_sampling``) ask for, counts cached in
    ``run_dir``; ``None`` when they are ``None``."""
    if settings is None:
        return None
    cache = Path(run_dir) / STATS_FILE
    return RareClassSampling.for_dataset(dataset, settings.temperature, settings.min_pixels, cache)
