"""Predict label maps for a folder of images and write them as PNGs."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.dgss.evaluate import (
    eval_config_for,
    find_run_config,
    infer_logits,
    resolve_model_folder,
)

FORMATS = ("label", "color", "overlay")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def palette_for(class_names: Sequence[str] | None, num_classes: int) -> np.ndarray:
    """``(K, 3)`` uint8 colours: the dataset palette when the classes are a known taxonomy.

    Cityscapes' 19 and CamVid's 11 classes get their official colours; other class lists get
    evenly spaced hues.
    """
    from pivotseg.data import taxonomy

    known = [
        (
            getattr(taxonomy, "CITYSCAPES_CLASSES", None),
            getattr(taxonomy, "CITYSCAPES_PALETTE", None),
        ),
        (getattr(taxonomy, "CAMVID_CLASSES", None), getattr(taxonomy, "CAMVID_PALETTE", None)),
    ]
    for classes, palette in known:
        if class_names is not None and classes is not None and list(class_names) == list(classes):
            return np.asarray(palette, dtype=np.uint8)
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95) for i in range(num_classes)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def render(pred: np.ndarray, image: np.ndarray, palette: np.ndarray, fmt: str) -> Image.Image:
    """The PNG content of one prediction in ``fmt`` (label, color or overlay)."""
    if fmt == "label":
        return Image.fromarray(pred.astype(np.uint8))  # 2-D uint8: a grey "L" PNG
    colour = palette[pred]
    if fmt == "color":
        return Image.fromarray(colour)
    blend = 0.5 * image.astype(np.float32) + 0.5 * colour.astype(np.float32)
    return Image.fromarray(blend.round().clip(0, 255).astype(np.uint8))


@torch.no_grad()
def predict(
    checkpoint: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    format: str = "label",
    mode: str | None = None,
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    backbone_source: str | None = None,
    device: str | None = None,
) -> list[Path]:
    """Segment every image of ``images_dir``; writes ``out_dir/<image stem>.png``.

    Args:
        checkpoint: a run folder or a checkpoint folder.
        images_dir: a folder of images (jpg, png, ...), not searched recursively.
        out_dir: where the PNGs go (created).
        format: ``label`` (the class index as a uint8 grey PNG, e.g. Cityscapes trainIds),
            ``color`` (class colours) or ``overlay`` (colours blended 50/50 on the image).
        mode, crop, stride: inference (default: the run's ``eval`` section, else whole-image).
        backbone_source: where the pretrained backbone is, if it moved since training.
        device: ``cpu``/``cuda``... (default: a GPU when there is one).

    Returns:
        The written files, in the order of the sorted image names.
    """
    from pivotseg.segmenter import load_segmenter

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: not a folder of images")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    folder = resolve_model_folder(checkpoint)
    run_cfg = find_run_config(folder)
    eval_cfg = eval_config_for(run_cfg, mode, crop, stride)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_segmenter(folder, backbone_source=backbone_source).to(device).eval()
    palette = palette_for(model.config.class_names, model.config.num_classes)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(files, desc="predict"):
        try:
            image = np.array(Image.open(path).convert("RGB"))
        except OSError as err:
            raise DataError(f"{path}: cannot read this image ({err})") from None
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
        pred = infer_logits(model, pixels, eval_cfg).argmax(1)[0].cpu().numpy()
        target = out_dir / f"{path.stem}.png"
        render(pred, image, palette, format).save(target)
        written.append(target)
    return written
