"""Predict label maps for a folder of images and write them as PNGs.

The per-image work is split so that other commands can reuse it: :func:`plan_outputs` (which
PNG each image gets; refuses collisions and existing files), :func:`read_images` (an iterator of
``(path, image)``), :func:`predict_labels` (one image to a label map at its own size under a
:class:`ResizePolicy`) and :func:`render` (the PNG content).

Output names: ``<stem>.png`` when no other image of the folder has the same stem (compared
case-insensitively), otherwise ``<file name>.png`` (``a.jpg`` -> ``a.jpg.png``), so that the
output's stem is the image's file name.
"""

from __future__ import annotations

import colorsys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pivotseg.data.io import IMAGE_EXTENSIONS, image_size, read_image
from pivotseg.data.transforms import resize_image
from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.dgss.evaluate import eval_config_for, infer_logits

FORMATS = ("label", "color", "overlay")
IMAGE_SUFFIXES = IMAGE_EXTENSIONS
# Logit elements (K x H x W) upsampled at once; larger maps go in row strips (8000x8000 x 19
# classes would need 4.9 GB in one piece).
UPSAMPLE_CHUNK = 2**25


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
    # round((a + b) / 2) with ties to even, in place in uint16: float copies of an 8000x8000
    # image take gigabytes and 40x the time.
    total = image.astype(np.uint16)
    total += colour
    half = total >> 1
    total &= half
    total &= 1
    half += total
    return Image.fromarray(half.astype(np.uint8))


# ----- which file each prediction goes to ----------------------------------------------------
def list_images(images_dir: str | Path) -> list[Path]:
    """The images of a folder (not searched recursively), sorted by name."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: not a folder of images")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """One PNG name per image, all different even on a case-insensitive file system.

    ``<stem>.png`` when the stem is unique, else ``<file name>.png``; an image whose stem-based
    name meets another image's name-based one (``a.jpg.png`` beside ``a.jpg`` and ``a.png``)
    also switches to its file name, until no two names meet.
    """
    stems = Counter(p.stem.casefold() for p in files)
    full = [stems[p.stem.casefold()] > 1 for p in files]
    while True:
        names = [f"{p.name if f else p.stem}.png" for p, f in zip(files, full)]
        taken = Counter(n.casefold() for n in names)
        clash = [i for i, n in enumerate(names) if taken[n.casefold()] > 1 and not full[i]]
        if not clash:
            return names
        for i in clash:
            full[i] = True


def plan_outputs(
    files: Sequence[Path], out_dir: str | Path, overwrite: bool = False
) -> list[tuple[Path, Path]]:
    """``(image, png)`` pairs under ``out_dir``; nothing is written.

    Raises:
        ConfigError: a PNG would replace one of the images (always), or PNGs exist already and
            ``overwrite`` is false (naming how many and the first ones).
    """
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in output_names(files)]
    inputs = {p.resolve() for p in files}
    for target in targets:
        if target.resolve() in inputs:
            raise ConfigError(
                f"{target}: the prediction would replace this input image; choose an --out "
                "folder other than the images folder"
            )
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        shown = ", ".join(t.name for t in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ConfigError(
            f"{out_dir}: {len(existing)} of the {len(targets)} PNGs exist already ({shown}); "
            "pass --overwrite to replace them or choose another --out"
        )
    return list(zip(files, targets))


def read_images(files: Sequence[Path], progress: bool = True) -> Iterator[tuple[Path, np.ndarray]]:
    """``(path, uint8 (H, W, 3) RGB)`` for each file, read when the consumer asks for it."""
    for path in tqdm(files, desc="predict", disable=not progress):
        yield path, read_image(path)


# ----- inference at a bounded size -----------------------------------------------------------
@dataclass
class ResizePolicy:
    """The size an image is segmented at; the label map is brought back to the image's size.

    Attributes:
        short: scale the short side to this (``None``: keep), as ``data.eval_resize_short``.
        max_long: then cap the long side at this (``None``: no cap).
        min_side: the smallest short side the model accepts; smaller images are enlarged.
    """

    short: int | None = None
    max_long: int | None = None
    min_side: int = 1

    def size_for(self, h: int, w: int) -> tuple[int, int]:
        factor = 1.0
        if self.short is not None:
            factor = self.short / min(h, w)
        if self.max_long is not None:
            factor = min(factor, self.max_long / max(h, w))
        factor = max(factor, self.min_side / min(h, w))
        if factor == 1.0:
            return h, w
        # mmcv's rescale_size rounding, as the evaluation transform
        return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


def min_input_side(model: torch.nn.Module) -> int:
    """Smallest image side the segmenter's coarsest feature map (and pyramid level) survives."""
    backbone = model.backbone
    strides = [backbone.size_divisor, *backbone.out_strides]
    strides += list(getattr(getattr(model.head, "pyramid", None), "out_strides", []))
    return max(int(s) for s in strides)


def resize_policy_for(
    run_cfg, model: torch.nn.Module, resize_short: int | None, max_long: int | None
) -> ResizePolicy:
    """The run's evaluation resize, or the given overrides (0 switches either off).

    ``short`` defaults to the run's ``data.eval_resize_short``. ``max_long`` defaults to the
    run's training cap ``data.max_size`` (2048 without a run config) when no short side is set,
    so that a huge photo never runs at full size by accident.
    """
    from pivotseg.config import DataConfig

    data = run_cfg.data if run_cfg is not None else DataConfig()
    short = data.eval_resize_short if resize_short is None else resize_short or None
    if max_long is None:
        max_long = data.max_size if short is None else None
    return ResizePolicy(short, max_long or None, min_input_side(model))


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class indices ``(H, W)`` of ``(1, K, h, w)`` logits bilinearly resized to ``size``.

    Small maps go through ``F.interpolate(..., align_corners=False)`` as evaluation does. Large
    ones are resized in row strips, each interpolated first along the height (by hand, with
    interpolate's source coordinates) and then along the width by interpolate: the same
    samples, equal up to float rounding, without ever holding the full-size logits.
    """
    k, h, w = logits.shape[1:]
    height, width = size
    if (h, w) == (height, width):
        return _argmax_classes(logits[0])
    if k * height * width <= UPSAMPLE_CHUNK:
        full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return _argmax_classes(full[0])
    rows = max(UPSAMPLE_CHUNK // (k * width), 1)
    out = torch.empty((height, width), dtype=_index_dtype(k), device=logits.device)
    for top in range(0, height, rows):
        dst = torch.arange(top, min(top + rows, height), device=logits.device)
        src = ((dst + 0.5) * (h / height) - 0.5).clamp(min=0)
        y0 = src.floor().long().clamp(max=h - 1)
        y1 = (y0 + 1).clamp(max=h - 1)
        weight = (src - y0).to(logits.dtype).view(1, 1, -1, 1)
        tall = logits[:, :, y0] * (1 - weight) + logits[:, :, y1] * weight
        strip = F.interpolate(tall, size=(len(dst), width), mode="bilinear", align_corners=False)
        out[top : top + len(dst)] = _argmax_classes(strip[0])
    return out


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int64


def _argmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """``argmax(0)`` of ``(K, H, W)`` (first maximum on ties), class by class.

    ``torch.argmax`` over the leading dimension of a large map is an order of magnitude slower
    than these K elementwise passes.
    """
    best = scores[0].clone()
    index = torch.zeros(best.shape, dtype=_index_dtype(len(scores)), device=scores.device)
    for k in range(1, len(scores)):
        better = scores[k] > best
        best = torch.where(better, scores[k], best)
        index.masked_fill_(better, k)
    return index


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module,
    image: np.ndarray,
    eval_cfg,
    policy: ResizePolicy,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class indices ``(H, W)`` of one ``uint8 (H, W, 3)`` image, at the image's own size."""
    h, w = image.shape[:2]
    small = resize_image(image, policy.size_for(h, w))
    pixels = torch.from_numpy(small.astype(np.float32)).permute(2, 0, 1)[None]
    logits = infer_logits(model, pixels.to(device), eval_cfg).float()
    return upsampled_argmax(logits, (h, w)).cpu().numpy()


# ----- the command --------------------------------------------------------------------------
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
    resize_short: int | None = None,
    max_long: int | None = None,
    overwrite: bool = False,
    labeller: Callable | None = None,
) -> list[Path]:
    """Segment every image of ``images_dir`` into one PNG each in ``out_dir``.

    Args:
        checkpoint: a run folder or a checkpoint folder.
        images_dir: a folder of images (jpg, png, ...), not searched recursively.
        out_dir: where the PNGs go (created); names as in the module docstring.
        format: ``label`` (the class index as a uint8 grey PNG, e.g. Cityscapes trainIds),
            ``color`` (class colours) or ``overlay`` (colours blended 50/50 on the image).
        mode, crop, stride: inference (default: the run's ``eval`` section, else whole-image).
        backbone_source: where the pretrained backbone is, if it moved since training.
        device: ``cpu``/``cuda``... (default: a GPU when there is one).
        resize_short: segment at this short side (default: the run's
            ``data.eval_resize_short``; 0 = the image's own size).
        max_long: cap on the long side at inference (default: the run's ``data.max_size``
            when no short side is set; 0 = no cap). Labels always come back at full size.
        overwrite: replace PNGs already in ``out_dir`` (otherwise they stop the run).
        labeller: ``(model, frames, size_for) -> iterator of (path, image, labels)`` in place
            of per-image inference, where ``frames`` yields ``(path, image)`` and ``size_for``
            is the resize policy's (``pivotseg predict --adapt`` passes
            :func:`pivotseg.tasks.adapt.stream_labeller`: predict each frame, then adapt).

    Returns:
        The written files, one per image, in the order of the sorted image names.
    """
    from pivotseg.segmenter import load_segmenter

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    plan = plan_outputs(list_images(images_dir), out_dir, overwrite)
    for image, _ in plan:
        image_size(image)  # a file that is no image stops the run before anything is written
    folder = resolve_model_folder(checkpoint)
    run_cfg = find_run_config(folder)
    eval_cfg = eval_config_for(run_cfg, mode, crop, stride)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_segmenter(folder, backbone_source=backbone_source).to(device).eval()
    policy = resize_policy_for(run_cfg, model, resize_short, max_long)
    if eval_cfg.mode == "slide" and min(eval_cfg.crop) < policy.min_side:
        raise ConfigError(
            f"slide window {eval_cfg.crop[0]}x{eval_cfg.crop[1]} (--crop, else the run's "
            f"eval.crop): this model needs windows of at least {policy.min_side} pixels; pass "
            f"--crop {policy.min_side} or larger"
        )
    palette = palette_for(model.config.class_names, model.config.num_classes)

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    targets = dict(plan)
    written = []
    frames = read_images([image for image, _ in plan])
    if labeller is None:
        labelled = (
            (path, image, predict_labels(model, image, eval_cfg, policy, device))
            for path, image in frames
        )
    else:
        labelled = labeller(model, frames, policy.size_for)
    for path, image, pred in labelled:
        render(pred, image, palette, format).save(targets[path], format="PNG")
        written.append(targets[path])
    return written
