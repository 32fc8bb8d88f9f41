"""Reading reference images/masks and writing predicted masks, with one-line errors.

Masks are single-channel PNGs (or palette PNGs, whose indices are read) holding 0 for
background and 1 or 255 for the object; a 3-channel mask is accepted when its channels are
identical. Anything else is rejected rather than guessed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pivotseg.data.io import read_image as read_rgb
from pivotseg.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_COLOR = (255, 64, 32)


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
        if not (values[..., :3] == values[..., :1]).all():
            raise DataError(
                f"{path}: colour mask; save a single-channel PNG with 0 = background, "
                "1 or 255 = object"
            )
        values = values[..., 0]
    return validate_mask(values, image_size, name=str(path))


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
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def write_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Save a boolean mask as a 0/255 single-channel PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)
    return path


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the mask tinted in :data:`OVERLAY_COLOR`."""
    out = image.astype(np.float32)
    color = np.array(OVERLAY_COLOR, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    return out.round().clip(0, 255).astype(np.uint8)


def write_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, mask)).save(path)
    return path
