"""`refseg run` targets (masks beside images are not targets) and the overlay's colours."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.tasks.refseg.images import list_targets, overlay
from tests.test_refseg_cli import save_image, save_mask
from tests.test_refseg_models import box_mask, random_image, sam_folder  # noqa: F401


def perseg_like_folder(folder):
    """Images with their masks beside them, named as the shared examples name them."""
    folder.mkdir()
    for k, stem in enumerate(["cat_00", "cat_01", "duck_toy_00"]):  # PerSeg / FSS: same stem
        save_image(folder / f"{stem}.jpg", random_image(40, 48, seed=k))
        save_mask(folder / f"{stem}.png", box_mask(40, 48, 5, 30, 10, 40), scale=1)
    save_image(folder / "Town10_000033_img.jpg", random_image(36, 50, seed=7))  # CarlaScapes
    save_mask(folder / "Town10_000033_labelIds.png", box_mask(36, 50, 0, 10, 0, 10))
    save_image(folder / "street.png", random_image(30, 30, seed=8))  # a PNG image, no mask
    save_mask(folder / "street_mask.png", box_mask(30, 30, 2, 9, 2, 9))
    return folder


def test_list_targets_leaves_out_masks_beside_their_images(tmp_path):
    folder = perseg_like_folder(tmp_path / "perseg")
    targets, skipped = list_targets([folder], exclude=[folder / "cat_00.png"])
    assert [p.name for p in targets] == [
        "Town10_000033_img.jpg",
        "cat_00.jpg",
        "cat_01.jpg",
        "duck_toy_00.jpg",
        "street.png",
    ]
    assert sorted(p.name for p in skipped) == [
        "Town10_000033_labelIds.png",
        "cat_00.png",
        "cat_01.png",
        "duck_toy_00.png",
        "street_mask.png",
    ]
    # A file named directly is a target, unless it is a reference mask.
    targets, skipped = list_targets(
        [folder / "cat_01.png", folder / "cat_00.png"], [str(folder / "cat_00.png")]
    )
    assert [p.name for p in targets] == ["cat_01.png"] and [p.name for p in skipped] == [
        "cat_00.png"
    ]


def test_cli_run_on_a_folder_segments_exactly_its_images(tmp_path, sam_folder, capsys):  # noqa: F811
    folder = perseg_like_folder(tmp_path / "perseg")
    # The reference mask as FSS-1000 publishes them: RGB holding 0/1, one stray pixel.
    rgb = np.repeat(box_mask(40, 48, 5, 30, 10, 40).astype(np.uint8)[..., None], 3, -1)
    rgb[6, 12] = (1, 1, 0)
    Image.fromarray(rgb, mode="RGB").save(folder / "cat_00.png")
    out = tmp_path / "out"
    argv = ["refseg", "run", "--ref", str(folder / "cat_00.jpg")]
    argv += ["--ref-mask", str(folder / "cat_00.png"), str(folder), "--out", str(out)]
    argv += ["--sam", sam_folder, "--min-match", "0"]
    with pytest.warns(UserWarning, match="cat_00.png: 1 pixel"):
        assert main(argv) == 0
    images = ["Town10_000033_img", "cat_00", "cat_01", "duck_toy_00", "street"]
    written = sorted(p.name for p in out.iterdir())
    expected = sorted([f"{s}.png" for s in images] + [f"{s}_overlay.jpg" for s in images])
    assert written == sorted(expected + ["scores.json"])
    scores = json.loads((out / "scores.json").read_text())
    assert sorted(scores) == sorted(
        str(folder / n)
        for n in ["Town10_000033_img.jpg", "cat_00.jpg", "cat_01.jpg", "duck_toy_00.jpg"]
        + ["street.png"]
    )
    assert "5 mask file(s) beside their images are not targets" in capsys.readouterr().out


def test_overlay_outlines_an_orange_object_in_a_contrasting_colour():
    orange = np.array([255, 140, 0], np.uint8)
    image = np.full((60, 80, 3), 128, np.uint8)
    image[10:50, 20:60] = orange
    mask = np.zeros((60, 80), bool)
    mask[10:50, 20:60] = True
    out = overlay(image, mask).astype(int)
    # Boundary pixels: opaque, in a colour far from orange (and from the grey background).
    for y, x in [(10, 20), (10, 40), (49, 59), (30, 20), (30, 59), (11, 21)]:
        colour = out[y, x]
        assert np.linalg.norm(colour - orange) > 250, (y, x, colour)
        assert np.linalg.norm(colour - 128) > 150
    assert len({tuple(out[y, x]) for y, x in [(10, 20), (49, 59), (30, 20)]}) == 1
    # Inside: a visible tint of the object; outside: untouched.
    assert np.linalg.norm(out[30, 40] - orange) > 80
    assert (out[:8] == 128).all() and (out[:, :18] == 128).all()
    # The same for a red object: the colour changes with the object.
    image[10:50, 20:60] = (255, 0, 0)
    assert np.linalg.norm(overlay(image, mask)[10, 20].astype(int) - (255, 0, 0)) > 250
