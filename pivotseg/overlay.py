"""Colour overlays of label maps, with a legend drawn beside the image (never on it).

Used by ``pivotseg predict --format overlay`` (and so the demo) and ``pivotseg ovseg --overlay``.
Only numpy and Pillow: the commands import it without start-up cost.

Legend layout (pixels): a white strip to the right of the image lists the classes present in
the label map, in class order, each as a ``SWATCH`` square of its colour (with a grey frame one
pixel outside it) followed by ``name  area %``. Rows are ``ROW`` high, ``PAD`` from the strip's
edges; entries fill a column down to the image's height (at least ``MIN_ROWS`` rows, so a tiny
image's legend stays readable and extends the canvas downwards), then the next column starts
``COLUMN_GAP`` to the right.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 6
ROW = 16
SWATCH = 12
TEXT_GAP = 5
COLUMN_GAP = 12
MIN_ROWS = 10
STRIP_COLOUR = (255, 255, 255)
FRAME_COLOUR = (128, 128, 128)
TEXT_COLOUR = (0, 0, 0)


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``round((image + palette[labels]) / 2)`` per channel (ties to even), ``uint8 (H, W, 3)``.

    Pixels whose label is not a palette index (255: ignore, open-vocabulary background) keep
    the image's value.
    """
    palette = np.asarray(palette, dtype=np.uint8)
    # Labels beyond the palette index black rows here and get the image back below.
    table = np.zeros((max(int(labels.max(initial=0)) + 1, len(palette)), 3), dtype=np.uint8)
    table[: len(palette)] = palette
    colour = table[labels]
    # In place in uint16: float copies of an 8000x8000 image take gigabytes and 40x the time.
    total = image.astype(np.uint16)
    total += colour
    half = total >> 1
    total &= half
    total &= 1
    half += total
    out = half.astype(np.uint8)
    outside = labels >= len(palette)
    if outside.any():
        out[outside] = image[outside]
    return out


@functools.cache
def legend_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font (no font file needed)."""
    return ImageFont.load_default()


def legend_entries(
    labels: np.ndarray, class_names: Sequence[str] | None, num_classes: int
) -> list[tuple[int, str]]:
    """``(class, text)`` for each class present in ``labels``: its name and share of the pixels.

    Shares are of all pixels, so with background (labels outside ``num_classes``) they sum to
    less than 100 %.
    """
    counts = np.bincount(labels.ravel(), minlength=num_classes)[:num_classes]
    total = max(labels.size, 1)
    entries = []
    for k in np.flatnonzero(counts):
        share = 100 * counts[k] / total
        name = class_names[k] if class_names is not None else f"class {k}"
        entries.append((int(k), f"{name}  {share:.1f}%" if share >= 0.1 else f"{name}  <0.1%"))
    return entries


def with_legend(
    overlay: np.ndarray, entries: Sequence[tuple[int, str]], palette: np.ndarray
) -> Image.Image:
    """``overlay`` on a canvas widened by a legend strip (see the module docstring)."""
    h, w = overlay.shape[:2]
    font = legend_font()
    if not entries:
        entries = [(-1, "no class")]
    rows = min(len(entries), max((h - 2 * PAD) // ROW, MIN_ROWS))
    columns = [entries[i : i + rows] for i in range(0, len(entries), rows)]
    widths = [
        SWATCH + TEXT_GAP + max(math.ceil(font.getlength(text)) for _, text in column)
        for column in columns
    ]
    strip = 2 * PAD + sum(widths) + COLUMN_GAP * (len(columns) - 1)
    canvas = Image.new("RGB", (w + strip, max(h, 2 * PAD + rows * ROW)), STRIP_COLOUR)
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = w + PAD
    for column, width in zip(columns, widths):
        for row, (k, text) in enumerate(column):
            top = PAD + row * ROW
            y = top + (ROW - SWATCH) // 2
            if k >= 0:
                draw.rectangle([left - 1, y - 1, left + SWATCH, y + SWATCH], outline=FRAME_COLOUR)
                draw.rectangle(
                    [left, y, left + SWATCH - 1, y + SWATCH - 1],
                    fill=tuple(int(c) for c in palette[k]),
                )
            draw.text((left + SWATCH + TEXT_GAP, top + ROW // 2), text, TEXT_COLOUR, font, "lm")
        left += width + COLUMN_GAP
    return canvas


def overlay_image(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    legend: bool = True,
) -> Image.Image:
    """Class colours blended 50/50 on ``image`` (:func:`blend`), with a legend strip beside it
    unless ``legend`` is false (then the result has the image's size)."""
    overlay = blend(image, labels, palette)
    if not legend:
        return Image.fromarray(overlay)
    return with_legend(overlay, legend_entries(labels, class_names, len(palette)), palette)
