"""Reading reference images/masks and writing predicted masks, with one-line errors.

Masks are single-channel PNGs (or palette PNGs, whose indices are read) holding 0 for
background and 1 or 255 for the object. A multi-channel mask is read as its first channel when
its colour channels agree on all but a few pixels (published FSS-1000 labels are RGB PNGs
holding 0/1, some with a pixel whose channels differ), with one warning naming the file; a true
colour mask is rejected rather than guessed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pivotseg.data.io import read_image as read_rgb
from pivotseg.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Overlay colours: saturated primaries and secondaries, one of which is far from any object.
OVERLAY_PALETTE = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (0, 255, 255),
    (255, 0, 255),
    (255, 255, 0),
)
# Share of a mask's pixels whose channels may disagree before it counts as a colour mask:
# FSS-1000's RGB labels have a stray pixel or two, a colour mask whole regions.
MAX_DISAGREEING = 0.001
MIN_DISAGREEING = 4  # ... and in any mask, this many pixels
_warned: set[str] = set()  # masks already warned about: one warning per file


def read_image(path: str | Path) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB, or a :class:`DataError` naming the file (16-bit images included:
    the datasets' reader, :func:`pivotseg.data.io.read_image`)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such image file")
    return read_rgb(path)


def check_readable(path: str | Path) -> Path:
    """Open the image header (cheap) so that a broken target fails before any model loads."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.verify()
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(
            f"{path}: cannot read the image ({type(err).__name__}); is it an image file?"
        ) from None
    return path


def read_mask(path: str | Path, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean ``(H, W)`` object mask from a 0/1 or 0/255 PNG.

    Args:
        path: the mask file.
        image_size: ``(H, W)`` of its image; a mask of another size is an error.

    Raises:
        DataError: unreadable, wrong size, values other than 0/1/255, or no object pixel.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            values = np.array(im)  # palette PNGs give their indices, as wanted
    except FileNotFoundError:
        raise DataError(f"{path}: no such mask file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(
            f"{path}: cannot read the mask ({type(err).__name__}); expected a PNG"
        ) from None
    if values.ndim == 3:
        values = first_channel(values, path)
    return validate_mask(values, image_size, name=str(path))


def first_channel(values: np.ndarray, path: Path) -> np.ndarray:
    """The first channel of an ``(H, W, C)`` mask whose colour channels (alpha aside) agree.

    Up to :data:`MAX_DISAGREEING` of the pixels (at least :data:`MIN_DISAGREEING`) may differ
    between channels (one warning per file names it); more is a colour mask, a
    :class:`DataError` giving the reason.
    """
    colour = values[..., :3] if values.shape[-1] >= 3 else values[..., :1]
    differ = (colour != colour[..., :1]).any(-1)
    count = int(differ.sum())
    if count == 0:
        return values[..., 0]
    if count > max(MIN_DISAGREEING, MAX_DISAGREEING * differ.size):
        colours = np.unique(colour.reshape(-1, colour.shape[-1]), axis=0)
        shown = ", ".join(
            str(tuple(int(v) for v in c)) for c in np.unique(colour[differ], axis=0)[:3]
        )
        raise DataError(
            f"{path}: colour mask ({count} of {differ.size} pixels differ between channels, "
            f"{len(colours)} distinct colours, e.g. {shown}); save a single-channel PNG with "
            "0 = background, 1 or 255 = object"
        )
    if str(path) in _warned:
        return values[..., 0]
    _warned.add(str(path))
    warnings.warn(
        f"{path}: {count} pixel(s) differ between the mask's channels; reading its first "
        "channel (save a single-channel PNG to silence this)",
        stacklevel=3,
    )
    return values[..., 0]


def validate_mask(
    values: np.ndarray, image_size: tuple[int, int] | None = None, name: str = "mask"
) -> np.ndarray:
    """Check a mask array (bool, or integers in {0, 1, 255}) and return it as bool."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise DataError(f"{name}: expected a 2-D mask, got shape {values.shape}")
    if image_size is not None and tuple(values.shape) != tuple(image_size):
        raise DataError(
            f"{name}: mask is {values.shape[1]}x{values.shape[0]} but its image is "
            f"{image_size[1]}x{image_size[0]} (width x height); use the mask of that image"
        )
    if values.dtype != bool:
        found = np.unique(values)
        extra = sorted(set(found.tolist()) - {0, 1, 255})
        if extra:
            shown = ", ".join(str(v) for v in extra[:5])
            raise DataError(
                f"{name}: mask is not binary (values {shown} besides 0/1/255); save it with "
                "0 = background and 1 or 255 = object"
            )
        values = values > 0
    if not values.any():
        raise DataError(f"{name}: mask is empty (no object pixel); a reference needs the object")
    return values


def list_images(paths: list[str | Path]) -> list[Path]:
    """Image files given directly or inside given folders (sorted), or a DataError."""
    return list_targets(paths, skip_masks=False)[0]


def list_targets(
    paths: list[str | Path], exclude: list[str | Path] = (), skip_masks: bool = True
) -> tuple[list[Path], list[Path]]:
    """Target images given directly or inside given folders, and the files left out.

    Left out: the files in ``exclude`` (the reference masks) wherever they are, and, inside a
    folder, every PNG that :func:`is_mask_of` an image beside it (``cat_00.png`` beside
    ``cat_00.jpg``, ``X_labelIds.png`` beside ``X_img.jpg``). A file named directly is a target
    unless it is in ``exclude``.
    """
    excluded = {Path(p).resolve() for p in exclude}
    out: list[Path] = []
    skipped: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            masks = mask_files(found) if skip_masks else set()
            for q in found:
                (skipped if q in masks or q.resolve() in excluded else out).append(q)
        elif p.exists():
            (skipped if p.resolve() in excluded else out).append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out, skipped


# How the shared examples and common layouts name a mask beside its image: the same stem
# (PerSeg, FSS-1000: cat_00.jpg + cat_00.png), or the stem with an image tag swapped for a
# label tag (CarlaScapes: X_img.jpg + X_labelIds.png; X.jpg + X_mask.png).
IMAGE_TAGS = ("img", "image", "leftimg8bit", "rgb")
MASK_TAGS = (
    "mask",
    "masks",
    "label",
    "labels",
    "labelids",
    "labeltrainids",
    "gt",
    "gtfine",
    "gtfine_labelids",
    "gtfine_labeltrainids",
    "annot",
    "anno",
    "seg",
    "segmentation",
)


def image_key(stem: str) -> str:
    """An image's stem without a trailing image tag, lower-cased."""
    stem = stem.lower()
    for tag in IMAGE_TAGS:
        for sep in ("_", "-"):
            if stem.endswith(sep + tag):
                return stem[: -len(tag) - 1]
    return stem


def is_mask_of(mask: Path, image: Path) -> bool:
    """Whether ``mask`` (a PNG) is named as the mask of ``image`` (see :data:`MASK_TAGS`)."""
    if mask.suffix.lower() != ".png" or mask == image:
        return False
    stem = mask.stem.lower()
    if stem == image.stem.lower():
        return True
    key = image_key(image.stem)
    return any(stem == key + sep + tag for tag in MASK_TAGS for sep in ("_", "-"))


def mask_files(files: list[Path]) -> set[Path]:
    """The PNGs among ``files`` (one folder's) that are masks of another file there."""
    by_key: dict[str, list[Path]] = {}
    for f in files:
        by_key.setdefault(f.stem.lower(), []).append(f)
        by_key.setdefault(image_key(f.stem), []).append(f)
    masks = set()
    for f in files:
        if f.suffix.lower() != ".png":
            continue
        stem = f.stem.lower()
        candidates = list(by_key.get(stem, []))
        for tag in MASK_TAGS:
            for sep in ("_", "-"):
                if stem.endswith(sep + tag):
                    candidates += by_key.get(stem[: -len(tag) - 1], [])
        if any(is_mask_of(f, image) for image in candidates):
            masks.add(f)
    return masks


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Save a boolean mask as a 0/255 single-channel PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)
    return path


def contrasting_colour(image: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """The colour of :data:`OVERLAY_PALETTE` farthest (RGB distance) from the object's mean.

    A fixed tint vanishes on an object of its own hue (red on an orange toy).
    """
    if not mask.any():
        return OVERLAY_PALETTE[0]
    mean = image[mask].reshape(-1, 3).astype(np.float32).mean(0)
    palette = np.array(OVERLAY_PALETTE, dtype=np.float32)
    return OVERLAY_PALETTE[int(np.linalg.norm(palette - mean, axis=1).argmax())]


def mask_outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within ``width`` pixels of its border (image edges count as border)."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the mask outlined and tinted in a colour that contrasts with the object.

    The outline (opaque, about 0.4 % of the shorter side, at least 2 pixels) keeps the
    object's extent visible whatever its colour; the fill tints the inside with ``alpha``.
    """
    mask = np.asarray(mask, dtype=bool)
    out = image.astype(np.float32)
    colour = np.array(contrasting_colour(image, mask), dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
    width = max(2, round(min(mask.shape) / 250))
    out[mask_outline(mask, width)] = colour
    return out.round().clip(0, 255).astype(np.uint8)


def write_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, mask)).save(path)
    return path
