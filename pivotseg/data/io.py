"""Reading images and label maps with Pillow, turning every failure into a one-line DataError.

Label maps come back as raw integer ids (the dataset's own numbering): palette PNGs give their
indices, 8/16-bit grey PNGs their values, colour PNGs an ``(H, W, 3)`` array (only formats that
define colours accept those). 16-bit RGB PNGs (SYNTHIA's ``GT/LABELS``) are not supported by
Pillow's modes, which keep only the high byte of each channel; :func:`read_png16_rgb` decodes them
twice, once per byte, to recover the full values.

Images are always ``uint8`` RGB. 16-bit images (grey or colour PNG/TIFF) keep the high byte of
each value, as Pillow does for 16-bit colour and as scikit-image's ``img_as_ubyte`` does; Pillow's
own conversion of 16-bit grey to RGB clips every value above 255 to white instead. A 16-bit image
whose values all stay below 4096 (8-, 10- or 12-bit data stored without scaling) would read as
nearly black, so it is refused with :class:`LowRangeImage` rather than read wrongly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pivotseg.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


def _open(path: Path, what: str) -> Image.Image:
    if not path.exists():
        raise DataError(f"{path}: {what} file is missing; restore it or remove its pair")
    try:
        img = Image.open(path)
        img.load()
    except _READ_ERRORS as err:
        raise DataError(
            f"{path}: cannot read the {what} ({err}); re-download or re-export the file, "
            "or remove it with its pair"
        ) from None
    return img


class LowRangeImage(DataError):
    """A 16-bit image whose values use so few bits that it reads as nearly black at 8 bits."""


# The high byte of a 16-bit value below 4096 is at most 15 of 255: a nearly black image.
_LOW_RANGE_HIGH_BYTE = 16


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as ``uint8 (H, W, 3)``; grey, palette, alpha and 16-bit images are converted.

    Raises:
        DataError: naming the file when it is missing, truncated or not an image;
            :class:`LowRangeImage` for a 16-bit image with values only below 4096.
    """
    return read_image_bits(path)[0]


def read_image_bits(path: str | Path) -> tuple[np.ndarray, int]:
    """:func:`read_image` and the bits per channel of the file (8 or 16)."""
    path = Path(path)
    img = _open(path, "image")
    bits = _bits_per_channel(img, path)
    return _to_rgb(img, bits, path), bits


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """:func:`read_image` for an image already opened (or made) with Pillow."""
    filename = getattr(img, "filename", "")
    path = Path(filename) if filename else None
    return _to_rgb(img, _bits_per_channel(img, path), path or "image")


def _to_rgb(img: Image.Image, bits: int, path: Path | str) -> np.ndarray:
    if img.mode.startswith("I") and bits == 16:
        grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    if bits == 16 and rgb.size and int(rgb.max()) < _LOW_RANGE_HIGH_BYTE:
        raise LowRangeImage(
            f"{path}: 16-bit image whose values all stay below 4096 of 65535 (8-, 10- or 12-bit "
            "data saved without scaling), so at 8 bits it is nearly black; stretch it to its "
            "real range and save it as an 8-bit image"
        )
    return rgb


def _bits_per_channel(img: Image.Image, path: Path | None) -> int:
    if img.mode.startswith("I;16"):
        return 16
    if img.format == "PNG" and path is not None and path.is_file():
        return 16 if _png_bit_depth(path) == 16 else 8
    if img.format == "TIFF":
        depth = img.tag_v2.get(258, (8,))
        depth = depth if isinstance(depth, tuple) else (depth,)
        return 16 if max(depth) == 16 else 8
    return 8


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except _READ_ERRORS as err:
        raise DataError(f"{path}: cannot read the image header ({err}); re-export it") from None
    return h, w


def read_label(path: str | Path) -> np.ndarray:
    """Raw label ids: ``(H, W)`` integers, or ``(H, W, 3)`` uint8 for colour label images.

    Raises:
        DataError: naming the file when it is missing or unreadable.
    """
    path = Path(path)
    img = _open(path, "label")
    if img.mode in ("P", "L", "1"):
        return np.asarray(img, dtype=np.uint8)
    if img.mode.startswith("I"):
        return np.asarray(img).astype(np.int64)
    if img.mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
        return read_png16_rgb(path)
    if img.mode in ("RGB", "RGBA"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if img.mode == "LA":
        return np.asarray(img.getchannel(0), dtype=np.uint8)
    raise DataError(f"{path}: label image mode {img.mode} is not supported; save it as a grey PNG")


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 26:
        return 8
    return head[24]


def read_png16_rgb(path: str | Path) -> np.ndarray:
    """A 16-bit RGB(A) PNG as ``int64 (H, W, 3)`` with the full 16-bit channel values.

    Pillow decodes such files to 8-bit RGB with the high byte of each channel (raw mode
    ``RGB;16B``). Decoding again with the little-endian raw mode (``RGB;16L``) makes the unpacker
    take the other byte, so two decodes give both bytes; the PNG filters are undone by the same
    zlib decoder either way.
    """
    path = Path(path)
    planes = []
    for order in ("B", "L"):
        try:
            img = Image.open(path)
            tile = img.tile[0]
            rawmode = f"{img.mode};16{order}"
            img.tile = [(tile[0], tile[1], tile[2], rawmode)]
            img.load()
        except _READ_ERRORS as err:
            raise DataError(f"{path}: cannot read the 16-bit label ({err}); re-export it") from None
        planes.append(np.asarray(img.convert("RGB"), dtype=np.int64))
    high, low = planes
    return high * 256 + low


def list_files(folder: Path, suffixes: tuple[str, ...], recursive: bool = False) -> list[Path]:
    """Sorted files in ``folder`` whose names end with one of ``suffixes`` (case-insensitive)."""
    if not folder.is_dir():
        return []
    pattern = "**/*" if recursive else "*"
    lowered = tuple(s.lower() for s in suffixes)
    return sorted(
        p for p in folder.glob(pattern) if p.is_file() and p.name.lower().endswith(lowered)
    )
