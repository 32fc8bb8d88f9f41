"""Overlays carry a legend strip beside the image (issue #17, item 8): predict, demo, ovseg."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from pivotseg.cli.main import main
from pivotseg.overlay import COLUMN_GAP, PAD, ROW, SWATCH, TEXT_GAP, overlay_image
from pivotseg.tasks.dgss.predict import palette_for
from tests.test_openvocab import clip_folder  # noqa: F401 (a fixture)
from tests.test_safety_predict import CLASSES, labels_of, make_model, write_image

PALETTE = np.array([[200, 30, 40], [20, 160, 60], [30, 60, 220], [250, 250, 0]], np.uint8)
NAMES = ["road", "car", "sky", "sign"]


def text_width(text: str) -> int:
    return math.ceil(ImageFont.load_default().getlength(text))


def swatch(canvas: np.ndarray, x: int, row: int) -> np.ndarray:
    """The SWATCH x SWATCH square of the entry in ``row`` of the column starting at ``x``."""
    y = PAD + row * ROW + (ROW - SWATCH) // 2
    return canvas[y : y + SWATCH, x : x + SWATCH]


def blended(image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The expected image area: 50/50 blend, rounded half to even; void pixels unchanged."""
    colour = palette[np.minimum(labels, len(palette) - 1)].astype(np.float64)
    mix = np.round(0.5 * image + 0.5 * colour).astype(np.uint8)
    return np.where((labels < len(palette))[..., None], mix, image)


def test_legend_strip_lists_present_classes_beside_the_unchanged_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    labels = np.full((120, 90), 255, np.int64)  # void: the image shows through
    labels[:60, :45] = 0  # 2700 of 10800 pixels: 25 %
    labels[60:, 45:] = 2
    labels[60:63, :10] = 3  # 30 pixels: 0.28 %
    out = np.asarray(overlay_image(image, labels, PALETTE, NAMES))
    texts = ["road  25.0%", "sky  25.0%", "sign  0.3%"]  # class 1 (car) is absent
    strip = 2 * PAD + SWATCH + TEXT_GAP + max(text_width(t) for t in texts)
    assert out.shape == (120, 90 + strip, 3)
    assert np.array_equal(out[:, :90], blended(image, labels, PALETTE))
    void = labels == 255
    assert np.array_equal(out[:, :90][void], image[void])
    for row, k in enumerate([0, 2, 3]):
        assert (swatch(out, 90 + PAD, row) == PALETTE[k]).all()
    # below the last entry the strip is blank
    assert (out[PAD + 3 * ROW :, 90:] == 255).all()
    # and there is text to the right of each swatch
    for row in range(3):
        y = PAD + row * ROW
        assert (out[y : y + ROW, 90 + PAD + SWATCH + TEXT_GAP :] < 128).any()


def test_a_short_image_gets_columns_and_a_taller_canvas():
    names = [f"c{i}" for i in range(12)]
    palette = palette_for(names, 12)
    image = np.zeros((40, 24, 3), np.uint8)
    labels = np.repeat(np.arange(12), 80).reshape(40, 24)  # 80 pixels = 8.3 % each
    out = np.asarray(overlay_image(image, labels, palette, names))
    # ten rows a column at least, so 10 + 2 entries: the canvas grows below the image
    width = SWATCH + TEXT_GAP + text_width("c10  8.3%")
    first = SWATCH + TEXT_GAP + max(text_width(f"c{i}  8.3%") for i in range(10))
    assert out.shape == (2 * PAD + 10 * ROW, 24 + 2 * PAD + first + COLUMN_GAP + width, 3)
    assert np.array_equal(out[:40, :24], blended(image, labels, palette))
    assert (out[40:, :24] == 255).all()  # below the image: blank, nothing drawn there
    for k in range(12):
        x = 24 + PAD + (0 if k < 10 else first + COLUMN_GAP)
        assert (swatch(out, x, k % 10) == palette[k]).all()


def test_without_legend_the_overlay_has_the_image_size():
    image = np.full((30, 20, 3), 101, np.uint8)
    labels = np.zeros((30, 20), np.int64)
    out = np.asarray(overlay_image(image, labels, PALETTE, NAMES, legend=False))
    assert out.shape == (30, 20, 3)
    assert np.array_equal(out, blended(image, labels, PALETTE))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def test_predict_overlay_has_the_legend_and_no_legend_switches_it_off(model, tmp_path):
    image = write_image(tmp_path / "a.png", 120, 64)
    run = ["predict", str(model), str(tmp_path / "a.png")]
    assert main([*run, "--out", str(tmp_path / "labels")]) == 0
    assert main([*run, "--out", str(tmp_path / "over"), "--format", "overlay"]) == 0
    assert main([*run, "--out", str(tmp_path / "bare"), "--format", "overlay", "--no-legend"]) == 0
    labels = labels_of(tmp_path / "labels" / "a.png").astype(np.int64)
    palette = palette_for(CLASSES, 3)
    over = np.asarray(Image.open(tmp_path / "over" / "a.png"))
    present = np.unique(labels)
    total = labels.size
    texts = [f"{CLASSES[k]}  {100 * (labels == k).sum() / total:.1f}%" for k in present]
    strip = 2 * PAD + SWATCH + TEXT_GAP + max(text_width(t) for t in texts)
    assert over.shape == (120, 64 + strip, 3)
    assert np.array_equal(over[:, :64], blended(image, labels, palette))
    for row, k in enumerate(present):
        assert (swatch(over, 64 + PAD, row) == palette[k]).all()
    bare = np.asarray(Image.open(tmp_path / "bare" / "a.png"))
    assert np.array_equal(bare, over[:, :64])


class FixedSegmenter:
    """An open-vocabulary segmenter stand-in whose label map is given: background on the left."""

    variant = "fixed"
    num_classes = 3
    class_names = ["road", "car", "sky"]

    def predict(self, image):
        labels = np.zeros(image.shape[:2], np.int64)
        labels[:, image.shape[1] // 2 :] = 2
        labels[:, :10] = 255
        return labels


def test_ovseg_overlay_keeps_background_pixels_and_lists_the_classes(tmp_path):
    from pivotseg.tasks.openvocab import predict_images
    from pivotseg.tasks.openvocab.run import class_palette

    image = np.random.default_rng(0).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "f0.png")
    predict_images(FixedSegmenter(), [tmp_path / "f0.png"], tmp_path / "out", overlay=True)
    labels = FixedSegmenter().predict(image)
    palette = class_palette(3)[:3]
    over = np.asarray(Image.open(tmp_path / "out" / "f0_overlay.png"))
    texts = ["road  33.3%", "sky  50.0%"]
    assert over.shape == (60, 40 + 2 * PAD + SWATCH + TEXT_GAP + max(map(text_width, texts)), 3)
    assert np.array_equal(over[:, :10], image[:, :10])  # background: the image itself
    assert np.array_equal(over[:, :40], blended(image, labels, palette))
    for row, k in enumerate([0, 2]):
        assert (swatch(over, 40 + PAD, row) == palette[k]).all()


def test_ovseg_cli_writes_overlays_with_a_legend_on_request(clip_folder, tmp_path, capsys):  # noqa: F811
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "f0.png")
    common = ["ovseg", str(tmp_path / "f0.png"), "--clip", str(clip_folder), "--templates"]
    common += ["single", "--classes", "road,car,sky", "--mode", "whole"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "f0_overlay.png").exists()
    assert main([*common, "--out", str(tmp_path / "out"), "--overlay"]) == 0
    assert "(+ _color.png, _overlay.png)" in capsys.readouterr().out
    labels = labels_of(tmp_path / "out" / "f0.png").astype(np.int64)
    colours = np.asarray(Image.open(tmp_path / "out" / "f0_color.png"))
    over = np.asarray(Image.open(tmp_path / "out" / "f0_overlay.png"))
    present = np.unique(labels)
    assert over.shape[0] == max(40, 2 * PAD + len(present) * ROW) and over.shape[1] > 56
    mix = np.round(0.5 * image + 0.5 * colours.astype(np.float64)).astype(np.uint8)
    assert np.array_equal(over[:40, :56], mix)
    for row, k in enumerate(present):
        assert (swatch(over, 56 + PAD, row) == colours[labels == k][0]).all()
    assert main([*common, "--out", str(tmp_path / "bare"), "--overlay", "--no-legend"]) == 0
    bare = np.asarray(Image.open(tmp_path / "bare" / "f0_overlay.png"))
    assert np.array_equal(bare, over[:40, :56])
