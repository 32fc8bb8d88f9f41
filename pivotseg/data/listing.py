"""What a dataset reader finds on disk, and the raw-id -> training-id decoder it uses.

Kept free of torch so that ``pivotseg data check`` reads a folder with NumPy and PIL only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pivotseg.data.taxonomy import IGNORE_INDEX, Color
from pivotseg.errors import DataError


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``domain`` overrides the dataset's (ACDC conditions)."""

    image: Path
    label: Path
    split: str | None = None
    domain: str | None = None


@dataclass
class Listing:
    """What a reader found on disk: matched pairs and the files left without a partner."""

    pairs: list[Sample] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_labels: list[Path] = field(default_factory=list)

    def extend(self, other: Listing) -> None:
        self.pairs += other.pairs
        self.unpaired_images += other.unpaired_images
        self.unpaired_labels += other.unpaired_labels


class LabelDecoder:
    """Maps raw label ids to training ids through a lookup table, rejecting undefined ids.

    Args:
        table: ``{raw_id: train_id}``; train ids are ``0..K-1`` or 255 (ignore).
        valid: how the valid raw ids read in an error message (e.g. "CamVid ids 0-11").
        colours: optional ``{(r, g, b): train_id}`` for formats whose labels may be colour images.

    Raw 255 is always accepted as ignore. Any other raw id missing from ``table`` raises a
    :class:`DataError` naming the file and the offending values.
    """

    def __init__(
        self,
        table: dict[int, int],
        valid: str,
        colours: dict[Color, int] | None = None,
    ):
        size = max(256, max(table, default=0) + 1)
        self.lut = np.full(size, -1, dtype=np.int64)
        self.lut[IGNORE_INDEX] = IGNORE_INDEX
        for raw, train in table.items():
            self.lut[raw] = train
        self.valid = valid
        self.colours = colours
        if colours:
            codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int64)
            order = np.argsort(codes)
            self._codes = codes[order]
            self._code_ids = np.array(list(colours.values()), dtype=np.int64)[order]

    def __call__(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        if raw.ndim == 3:
            return self._decode_colours(raw, path)
        if raw.dtype == np.uint8:
            out = self.lut[raw]
        else:
            raw = raw.astype(np.int64, copy=False)
            inside = (raw >= 0) & (raw < len(self.lut))
            out = np.full(raw.shape, -1, dtype=np.int64)
            out[inside] = self.lut[raw[inside]]
        bad = out < 0
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
            raise DataError(
                f"{path}: label values {shown} are outside the {self.valid} (255 = ignore); "
                "fix the file, or read it with --format folder and a mapping file"
            )
        return out

    def _decode_colours(self, rgb: np.ndarray, path: Path | str) -> np.ndarray:
        if not self.colours:
            raise DataError(
                f"{path}: label is a colour image; this format expects single-channel ids "
                f"({self.valid}); use the id PNGs of the dataset"
            )
        rgb = rgb[..., :3].astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        idx = np.clip(np.searchsorted(self._codes, code), 0, len(self._codes) - 1)
        found = self._codes[idx] == code
        if not found.all():
            bad = np.unique(code[~found])[:4]
            shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in bad)
            raise DataError(
                f"{path}: label colours {shown} are not in the format's palette; "
                "use the dataset's original label files"
            )
        return self._code_ids[idx]
