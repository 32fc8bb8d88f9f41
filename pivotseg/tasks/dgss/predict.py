"""Predict label maps for images and write them as PNGs; the same inference for one image in
Python (:meth:`pivotseg.segmenter.Segmenter.predict`).

The per-image work is split so that other commands can reuse it: :func:`plan_outputs` (which
PNG each image gets; refuses collisions and existing files), :func:`read_images` (an iterator of
``(path, image)``), :func:`inference_settings` (the run's inference mode and
:class:`ResizePolicy`, with overrides), :func:`segment` (one image to a label map, and
optionally class probabilities, at its own size) and :func:`render` (the PNG content).

Output names: ``<stem>.png`` when no other image has the same stem (compared
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

from pivotseg.config import EvalConfig
from pivotseg.data.io import IMAGE_EXTENSIONS, image_size, pil_to_rgb, read_image
from pivotseg.data.transforms import resize_image
from pivotseg.engine.checkpoint import resolve_model_folder
from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.dgss.evaluate import eval_config_for, infer_logits, with_tta

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


def render(
    pred: np.ndarray,
    image: np.ndarray,
    palette: np.ndarray,
    fmt: str,
    class_names: Sequence[str] | None = None,
    legend: bool = True,
) -> Image.Image:
    """The PNG content of one prediction in ``fmt`` (label, color or overlay).

    ``overlay`` blends the class colours 50/50 on the image and, unless ``legend`` is false,
    adds a legend strip of the classes present beside it (:mod:`pivotseg.overlay`).
    """
    if fmt == "label":
        return Image.fromarray(pred.astype(np.uint8))  # 2-D uint8: a grey "L" PNG
    if fmt == "color":
        return Image.fromarray(palette[pred])
    from pivotseg.overlay import overlay_image

    return overlay_image(image, pred, palette, class_names, legend)


# ----- which file each prediction goes to ----------------------------------------------------
def list_images(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files: a folder's (sorted by name, not searched recursively), or the files and
    folders given, in the order given.

    A file named directly is taken whatever its extension (it must still open as an image).

    Raises:
        DataError: a path that does not exist, a folder without images, or two different
            files of the same name (their PNGs would meet in one output folder).
    """
    items = [images] if isinstance(images, (str, Path)) else list(images)
    if not items:
        raise DataError("no images given; pass image files or a folder of images")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such image file or folder; check the path")
    return _distinct_names(files)


def _distinct_names(files: list[Path]) -> list[Path]:
    """``files`` without repeats of one file; two different files of one name are refused."""
    seen: dict[str, Path] = {}
    kept = []
    for path in files:
        first = seen.setdefault(path.name.casefold(), path)
        if first is path:
            kept.append(path)
        elif not first.samefile(path):
            raise DataError(
                f"{first} and {path}: two images named {path.name}, whose PNGs would have the "
                "same name; rename one or predict them into separate --out folders"
            )
    return kept


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


def inference_settings(
    model: torch.nn.Module,
    mode: str | None = None,
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    resize_short: int | None = None,
    max_long: int | None = None,
) -> tuple[EvalConfig, ResizePolicy]:
    """How ``model`` segments an image: its run's ``eval`` section and resize policy
    (``model.run_config``, set by :func:`~pivotseg.segmenter.load_segmenter`; defaults without
    one), with the given overrides (``None`` keeps the run's).

    Raises:
        ConfigError: a slide window smaller than the model's minimum input side.
    """
    own = getattr(model, "inference_settings", None)
    if own is not None:  # an OnnxSegmenter: its sidecar holds the run's settings
        return own(mode, crop, stride, resize_short, max_long)
    run_cfg = getattr(model, "run_config", None)
    eval_cfg = eval_config_for(run_cfg, mode, crop, stride)
    policy = resize_policy_for(run_cfg, model, resize_short, max_long)
    if eval_cfg.mode == "slide" and min(eval_cfg.crop) < policy.min_side:
        raise ConfigError(
            f"slide window {eval_cfg.crop[0]}x{eval_cfg.crop[1]} (--crop, else the run's "
            f"eval.crop): this model needs windows of at least {policy.min_side} pixels; pass "
            f"--crop {policy.min_side} or larger"
        )
    return eval_cfg, policy


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


# ----- one image ----------------------------------------------------------------------------
@dataclass
class Prediction:
    """One image segmented at its own size (:meth:`pivotseg.segmenter.Segmenter.predict`).

    Attributes:
        labels: class indices ``(H, W)``: the arg-max of the logits resized to the image, what
            ``pivotseg predict`` writes (int64 from ``Segmenter.predict``).
        probabilities: ``float32 (K, H, W)``, or ``None`` when not asked for. Softmax of the
            resized logits; for a ``mask2former`` head, whose scores are sums of class times
            mask probabilities rather than logits, the scores divided by their sum. Their
            arg-max is ``labels`` up to float ties.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None


@torch.no_grad()
def segment(
    model: torch.nn.Module,
    image: np.ndarray,
    eval_cfg: EvalConfig,
    policy: ResizePolicy,
    device: torch.device | str = "cpu",
    probabilities: bool = False,
) -> Prediction:
    """One ``uint8 (H, W, 3)`` image at the policy's size, brought back to ``(H, W)``.

    Labels come in the smallest integer type that holds the classes (uint8 up to 256).
    """
    h, w = image.shape[:2]
    small = resize_image(image, policy.size_for(h, w))
    pixels = torch.from_numpy(small.astype(np.float32)).permute(2, 0, 1)[None]
    logits = infer_logits(model, pixels.to(device), eval_cfg).float()
    labels = upsampled_argmax(logits, (h, w)).cpu().numpy()
    if not probabilities:
        return Prediction(labels)
    return Prediction(labels, class_probabilities(model, logits, (h, w)))


def predict_labels(
    model: torch.nn.Module,
    image: np.ndarray,
    eval_cfg: EvalConfig,
    policy: ResizePolicy,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class indices ``(H, W)`` of one ``uint8 (H, W, 3)`` image, at the image's own size."""
    return segment(model, image, eval_cfg, policy, device).labels


def class_probabilities(
    model: torch.nn.Module, logits: torch.Tensor, size: tuple[int, int]
) -> np.ndarray:
    """``float32 (K, *size)`` of ``(1, K, h, w)`` scores (see :class:`Prediction`)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    scores = logits[0]
    if model.config.head == "mask2former":
        scores = scores.clamp_(min=0)
        scores /= scores.sum(0, keepdim=True).clamp_(min=torch.finfo(scores.dtype).tiny)
    else:
        # In place: the full-size map is as large as the result.
        scores -= scores.amax(0, keepdim=True)
        scores.exp_()
        scores /= scores.sum(0, keepdim=True)
    return scores.cpu().numpy()


def image_array(image) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB from a path, a PIL image or such an array.

    Paths and PIL images are converted as ``pivotseg predict`` reads files (grey, palette,
    alpha and 16-bit images: :func:`pivotseg.data.io.read_image`).

    Raises:
        DataError: a missing file, an unreadable one, or an array of another shape or type.
    """
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise DataError(f"{image}: no such image file; check the path")
        return read_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return image
        raise DataError(
            f"image array of shape {image.shape} and type {image.dtype}: give uint8 RGB "
            "(H, W, 3); for grey, alpha or 16-bit arrays pass PIL.Image.fromarray(array), "
            "which is converted as pivotseg predict converts files"
        )
    raise DataError(
        f"image of type {type(image).__name__}: give a file path, a PIL image or a uint8 "
        "(H, W, 3) numpy array"
    )


def predict_image(
    model: torch.nn.Module,
    image,
    *,
    probabilities: bool = True,
    mode: str | None = None,
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    resize_short: int | None = None,
    max_long: int | None = None,
    tta_scales: Sequence[float] | None = None,
    tta_flip: bool | None = None,
) -> Prediction:
    """:meth:`pivotseg.segmenter.Segmenter.predict` (the documentation is there)."""
    pixels = image_array(image)
    eval_cfg, policy = inference_settings(model, mode, crop, stride, resize_short, max_long)
    eval_cfg = with_tta(eval_cfg, tta_scales, tta_flip)
    was_training = model.training
    model.eval()
    try:
        device = model.pixel_mean.device
        result = segment(model, pixels, eval_cfg, policy, device, probabilities)
    finally:
        model.train(was_training)
    return Prediction(result.labels.astype(np.int64), result.probabilities)


# ----- the command --------------------------------------------------------------------------
@torch.no_grad()
def predict(
    checkpoint: str | Path,
    images: str | Path | Sequence[str | Path],
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
    legend: bool = True,
    engine: str | None = None,
    tta_scales: Sequence[float] | None = None,
    tta_flip: bool | None = None,
) -> list[Path]:
    """Segment images into one PNG each in ``out_dir``.

    Args:
        checkpoint: a run folder or a checkpoint folder, or an ``.onnx`` export.
        images: a folder of images (jpg, png, ...; not searched recursively), an image file,
            or a list of files and folders (:func:`list_images`).
        out_dir: where the PNGs go (created); names as in the module docstring.
        format: ``label`` (the class index as a uint8 grey PNG, e.g. Cityscapes trainIds),
            ``color`` (class colours) or ``overlay`` (colours blended 50/50 on the image, with
            a legend strip beside it).
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
        legend: with ``overlay``, draw the legend strip (false: PNGs of the image's size).
        engine: ``torch`` or ``onnxruntime`` (:mod:`pivotseg.deploy`; a run is exported
            first); default ``onnxruntime`` for an ``.onnx`` file, else ``torch``.
        tta_scales, tta_flip: test-time augmentation (default: the run's ``eval`` section);
            ``--adapt`` has its own (the teacher's scales and flip).

    Returns:
        The written files, one per image, in the order of :func:`list_images`.
    """
    from pivotseg.deploy.onnx_runtime import check_engine, open_onnx_model
    from pivotseg.segmenter import load_segmenter

    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if labeller is not None and (tta_scales is not None or tta_flip is not None):
        raise ConfigError(
            "--adapt segments each frame with its teacher's own views (teacher scales and "
            "flip); drop --tta-scales / --tta-flip"
        )
    plan = plan_outputs(list_images(images), out_dir, overwrite)
    for image, _ in plan:
        image_size(image)  # a file that is no image stops the run before anything is written
    engine = check_engine(checkpoint, engine)
    if engine == "onnxruntime":
        if labeller is not None:
            raise ConfigError("--adapt trains the model as it predicts: use --engine torch")
        device = torch.device("cpu")  # ONNX Runtime's CPU provider reads and writes CPU memory
        model = open_onnx_model(checkpoint, backbone_source)
    else:
        folder = resolve_model_folder(checkpoint)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_segmenter(folder, backbone_source=backbone_source).to(device).eval()
    eval_cfg, policy = inference_settings(model, mode, crop, stride, resize_short, max_long)
    eval_cfg = with_tta(eval_cfg, tta_scales, tta_flip)
    names, num_classes = model.config.class_names, model.config.num_classes
    palette = palette_for(names, num_classes)

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
        png = render(pred, image, palette, format, names, legend)
        png.save(targets[path], format="PNG")
        written.append(targets[path])
    return written
