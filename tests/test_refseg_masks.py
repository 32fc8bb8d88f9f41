"""Mask files as published: RGB masks holding 0/1, stray pixels, true colour masks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from pivotseg.errors import DataError
from pivotseg.tasks.refseg.images import read_mask


def save_rgb(path, values):
    Image.fromarray(values.astype(np.uint8), mode="RGB").save(path)
    return path


def object_box(h=40, w=50, scale=1):
    """An RGB mask holding ``scale`` on rows 10-29 x columns 5-34, 0 elsewhere."""
    values = np.zeros((h, w, 3), np.uint8)
    values[10:30, 5:35] = scale
    return values


@pytest.mark.parametrize("scale", [1, 255])
def test_rgb_mask_with_equal_channels_reads_silently(tmp_path, scale):
    path = save_rgb(tmp_path / "m.png", object_box(scale=scale))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = read_mask(path, (40, 50))
    assert mask.sum() == 20 * 30 and mask[10, 5] and not mask[9, 5]


def test_rgb_mask_with_a_stray_pixel_reads_its_first_channel_with_one_warning(tmp_path):
    # FSS-1000's labels: RGB 0/1 in which one pixel has channels that disagree.
    values = object_box(scale=1)
    values[12, 7] = (1, 1, 0)
    values[0, 0] = (0, 1, 0)
    path = save_rgb(tmp_path / "fss_label.png", values)
    with pytest.warns(UserWarning, match="fss_label.png: 2 pixel") as record:
        mask = read_mask(path, (40, 50))
    assert len(record) == 1
    # The first channel: the stray (1, 1, 0) is object, the stray (0, 1, 0) background.
    assert mask.sum() == 20 * 30 and mask[12, 7] and not mask[0, 0]
    # Said once per file: reading it again stays silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_mask(path, (40, 50)).sum() == 20 * 30


def test_true_colour_mask_is_refused_with_the_reason(tmp_path):
    values = object_box(scale=0)
    values[10:30, 5:20] = (255, 0, 0)
    values[10:30, 20:35] = (0, 128, 0)
    path = save_rgb(tmp_path / "colours.png", values)
    with pytest.raises(DataError) as err:
        read_mask(path, (40, 50))
    message = str(err.value)
    assert "colours.png: colour mask" in message and "\n" not in message
    assert "600 of 2000 pixels differ" in message and "3 distinct colours" in message
    assert "(255, 0, 0)" in message and "single-channel" in message


def test_rgba_mask_ignores_its_alpha(tmp_path):
    values = np.concatenate([object_box(scale=255), np.full((40, 50, 1), 255, np.uint8)], -1)
    Image.fromarray(values, mode="RGBA").save(tmp_path / "rgba.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_mask(tmp_path / "rgba.png", (40, 50)).sum() == 20 * 30


@pytest.mark.parametrize(
    "values, message",
    [
        (object_box(h=30, scale=1), "mask is 50x30 but its image is 50x40"),
        (object_box(scale=0), "empty"),
    ],
)
def test_rgb_mask_of_another_size_or_empty_is_a_one_line_error(tmp_path, values, message):
    path = save_rgb(tmp_path / "bad_rgb.png", values)
    with pytest.raises(DataError, match=message) as err:
        read_mask(path, (40, 50))
    assert "bad_rgb.png" in str(err.value) and "\n" not in str(err.value)
