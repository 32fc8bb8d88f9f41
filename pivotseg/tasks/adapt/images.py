"""Unlabelled target images: listing a folder, reading, resizing and batching.

Only image files are ever opened: a folder is listed without recursion (a dataset root would
otherwise hand its label PNGs over as images), and nothing here knows about label files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pivotseg.data.io import IMAGE_EXTENSIONS, image_size, read_image
from pivotseg.data.transforms import resize_image
from pivotseg.errors import DataError

SizeFn = Callable[[int, int], tuple[int, int]]


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files of a folder (sorted, not recursive), or a given list of files.

    Every file's header is read up front, so that an unreadable image stops the adaptation
    before it starts rather than minutes into it.

    Raises:
        DataError: one line naming the folder (missing, not a folder, no images) or the file.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder; give a folder of target images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(
                f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder; give the "
                "folder that holds the target images themselves"
            )
    else:
        files = [Path(p) for p in source]
        if not files:
            raise DataError("no target images given; pass a folder or a non-empty list of files")
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: image file is missing; restore it or leave it out")
        image_size(path)
    return files


def load_image(path: Path, size_for: SizeFn | None = None) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB, resized to ``size_for(H, W)`` when given (e.g. a
    :class:`~pivotseg.tasks.dgss.predict.ResizePolicy`'s ``size_for``, as prediction sizes it)."""
    image = read_image(path)
    return image if size_for is None else resize_image(image, size_for(*image.shape[:2]))


def stack(
    images: Sequence[np.ndarray], fill: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(B, 3, H, W)`` float 0-255 and its ``(B, H, W)`` mask of real pixels.

    Images of different sizes are padded bottom/right to the largest with ``fill`` (the
    backbone's mean colour, which normalises to 0 like the segmenter's own padding); padded
    pixels get no pseudo-label and no loss.
    """
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    batch = fill.reshape(1, 3, 1, 1).to(device).repeat(len(images), 1, h, w)
    valid = torch.zeros(len(images), h, w, dtype=torch.bool, device=device)
    for i, im in enumerate(images):
        pixels = torch.tensor(im).permute(2, 0, 1).to(device)
        batch[i, :, : im.shape[0], : im.shape[1]] = pixels.float()
        valid[i, : im.shape[0], : im.shape[1]] = True
    return batch, valid
