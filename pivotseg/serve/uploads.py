"""Uploaded files to images and masks, with one-line messages naming the upload.

An upload is read through the same readers as files on disk (:func:`pivotseg.data.io.read_image`,
:func:`pivotseg.tasks.refseg.images.read_mask`), from a private temporary copy: those readers
need a path (a PNG's bit depth is read from the file), and so the web app converts grey, palette,
alpha and 16-bit images exactly as ``pivotseg predict`` and ``pivotseg refseg`` do. The size in
pixels is checked from the header before anything is decoded.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pivotseg.errors import DataError

if TYPE_CHECKING:  # numpy stays out of pivotseg serve --help
    import numpy as np

# Beyond this a decoded RGB image alone takes 150 MB and a forward at full size is minutes.
DEFAULT_MAX_MEGAPIXELS = 50.0
DEFAULT_MAX_UPLOAD_MB = 50.0


class UploadTooLarge(DataError):
    """The upload's bytes are over the server's limit."""


def safe_name(name: str | None) -> str:
    """The upload's base name, reduced to characters safe in a file name (for messages and the
    temporary copy); ``upload`` when nothing is left."""
    base = Path(str(name or "")).name
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .")
    return base[:120] or "upload"


def too_large_message(name: str, size: int, limit: int) -> str:
    return (
        f"{name}: {size / 2**20:.3g} MB is over this server's limit of {limit / 2**20:.3g} MB "
        "per file; shrink the image or restart with pivotseg serve --max-upload-mb N"
    )


def _read(name: str, data: bytes, reader) -> np.ndarray:
    if not data:
        raise DataError(f"{name}: empty file; drop the image itself")
    with tempfile.TemporaryDirectory(prefix="pivotseg-serve-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            return reader(path)
        except DataError as err:
            # The readers name the temporary copy; the user knows the file by its own name.
            raise type(err)(str(err).replace(str(path), name)) from None


def check_pixels(path: Path, name: str, max_megapixels: float) -> None:
    from pivotseg.data.io import image_size

    h, w = image_size(path)
    if h * w > max_megapixels * 1e6:
        raise DataError(
            f"{name}: {w}x{h} is {h * w / 1e6:.3g} megapixels, over this server's limit of "
            f"{max_megapixels:g}; downscale it or restart with pivotseg serve --max-megapixels N"
        )


def read_upload_image(
    name: str, data: bytes, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
) -> np.ndarray:
    """uint8 ``(H, W, 3)`` RGB of an uploaded image file.

    Raises:
        DataError: naming the upload: empty, not an image, truncated, or too many pixels.
    """
    from pivotseg.data.io import read_image

    def reader(path: Path) -> np.ndarray:
        check_pixels(path, name, max_megapixels)
        return read_image(path)

    return _read(safe_name(name), data, reader)


def read_upload_mask(name: str, data: bytes, image_size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` object mask of an uploaded mask PNG for an image of ``image_size``.

    Raises:
        DataError: naming the upload (the rules of ``pivotseg refseg --ref-mask``).
    """
    from pivotseg.tasks.refseg.images import read_mask

    def reader(path: Path) -> np.ndarray:
        # Its image passed the pixel limit; a mask far larger is refused before it is decoded.
        check_pixels(path, name, max(1.0, 4e-6 * image_size[0] * image_size[1]))
        return read_mask(path, image_size)

    name = safe_name(name)
    return _read(name, data, reader)
