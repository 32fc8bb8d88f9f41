"""Open-vocabulary prediction on image files and evaluation on any dataset pivotseg reads."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.openvocab.segmenter import OpenVocabSegmenter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (not recursively) in the given folders, sorted."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image or folder")
    if not files:
        raise DataError(
            f"{', '.join(str(i) for i in inputs)}: no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files


def class_palette(num_classes: int, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """``(256, 3)`` uint8 colours indexed by label: ``palette`` (a dataset's) or spread hues;
    255 (background / ignore) is black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    if palette is not None and len(palette) >= num_classes:
        table[:num_classes] = np.asarray(palette[:num_classes], dtype=np.uint8)
    else:
        hues = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95) for i in range(num_classes)]
        table[:num_classes] = (np.asarray(hues).reshape(-1, 3) * 255).round().astype(np.uint8)
    return table


@torch.no_grad()
def predict_images(
    segmenter: OpenVocabSegmenter,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    palette: Sequence[Sequence[int]] | None = None,
    overlay: bool = False,
    legend: bool = True,
) -> list[Path]:
    """Segment images; writes ``<stem>.png`` (labels, uint8; background 255) and
    ``<stem>_color.png`` (class colours) into ``out_dir``.

    With ``overlay``, also ``<stem>_overlay.png``: the class colours blended on the image
    (background pixels keep the image) with a legend strip beside it unless ``legend`` is false,
    as ``pivotseg predict --format overlay`` draws it (:mod:`pivotseg.overlay`).

    Returns:
        The label PNGs written, in input order.
    """
    from pivotseg.data.io import read_image

    files = list_images(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = class_palette(segmenter.num_classes, palette)
    written = []
    for path in tqdm(files, desc=f"ovseg {segmenter.variant}"):
        image = read_image(path)
        labels = segmenter.predict(image).astype(np.uint8)
        target = out_dir / f"{path.stem}.png"
        Image.fromarray(labels).save(target)
        Image.fromarray(colours[labels]).save(out_dir / f"{path.stem}_color.png")
        if overlay:
            from pivotseg.overlay import overlay_image

            k = segmenter.num_classes
            picture = overlay_image(image, labels, colours[:k], segmenter.class_names, legend)
            picture.save(out_dir / f"{path.stem}_overlay.png")
        written.append(target)
    return written


@torch.no_grad()
def evaluate_dataset(
    segmenter: OpenVocabSegmenter,
    dataset,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """mIoU of ``segmenter`` on a pivotseg dataset whose classes it predicts, in order.

    Pixels predicted as background (background prompts or threshold) count as wrong for the
    labelled class. Returns :meth:`ConfusionMatrix.compute`'s dict plus ``class_names``.

    Raises:
        ConfigError: the segmenter's classes differ in number from the dataset's.
    """
    from pivotseg.evaluation import ConfusionMatrix

    k = len(dataset.classes)
    if segmenter.num_classes != k:
        raise ConfigError(
            f"evaluation: the dataset has {k} classes but the segmenter {segmenter.num_classes}; "
            "build it with the dataset's class names (the default when --classes is omitted)"
        )
    extra = 1 if segmenter.has_background_rule else 0
    matrix = ConfusionMatrix(k + extra)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for i in tqdm(range(count), desc="ovseg eval", disable=not progress):
        item = dataset[i]
        image, label = item["image"], item["label"]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        label = torch.as_tensor(np.asarray(label)).long()
        pixels = image[None].float()
        if tuple(pixels.shape[-2:]) != tuple(label.shape):
            pixels = torch.nn.functional.interpolate(
                pixels, size=tuple(label.shape), mode="bilinear", align_corners=False
            )
        pred = segmenter.predict_labels(pixels)[0].cpu()
        if extra:
            pred = pred.masked_fill(pred == segmenter.background_label, k)
        matrix.update(pred, label)
    result = matrix.compute()
    if extra:
        # The background column only collects misses; it is not a class of the dataset.
        iou, class_acc = result["iou"][:k], result["class_acc"][:k]
        result.update(iou=iou, class_acc=class_acc, miou=_nanmean(iou), macc=_nanmean(class_acc))
    result["class_names"] = list(dataset.classes)
    return result


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def format_result(result: dict) -> str:
    """A short table: mIoU, pixel accuracy and per-class IoU."""
    lines = [f"mIoU {100 * result['miou']:.2f}  aAcc {100 * result['acc']:.2f}"]
    for name, iou in zip(result["class_names"], result["iou"]):
        lines.append(f"  {name:<24} {'-' if math.isnan(iou) else f'{100 * iou:.2f}'}")
    return "\n".join(lines)
