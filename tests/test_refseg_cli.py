"""Reading masks, FSS episodes and the ``pivotseg refseg`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.errors import DataError
from pivotseg.tasks.refseg.base import ReferenceSegmenter
from pivotseg.tasks.refseg.episodes import evaluate_episodes, list_classes
from pivotseg.tasks.refseg.images import read_image, read_mask
from tests.test_refseg_models import box_mask, random_image, sam2_folder, sam_folder  # noqa: F401


def save_image(path, image):
    Image.fromarray(image).save(path)
    return path


def save_mask(path, mask, scale=255):
    Image.fromarray((mask * scale).astype(np.uint8), mode="L").save(path)
    return path


# ----- reading ----------------------------------------------------------------------------------
def test_mask_files_are_checked(tmp_path):
    ok = read_mask(save_mask(tmp_path / "a.png", box_mask(10, 12, 2, 6, 3, 9), scale=1), (10, 12))
    assert ok.dtype == bool and ok.sum() == 4 * 6
    assert (
        read_mask(save_mask(tmp_path / "b.png", box_mask(10, 12, 0, 5, 0, 5)), (10, 12)).sum() == 25
    )
    cases = {
        "empty.png": (np.zeros((10, 12), np.uint8), "empty"),
        "gray.png": (np.arange(120, dtype=np.uint8).reshape(10, 12), "not binary"),
        "small.png": (np.ones((8, 12), np.uint8), "mask is 12x8 but its image is 12x10"),
    }
    for name, (values, message) in cases.items():
        path = tmp_path / name
        Image.fromarray(values, mode="L").save(path)
        with pytest.raises(DataError, match=message) as err:
            read_mask(path, (10, 12))
        assert name in str(err.value) and "\n" not in str(err.value)
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[2:5, 2:5] = (255, 0, 0)
    save_image(tmp_path / "red.png", rgb)
    with pytest.raises(DataError, match="colour mask"):
        read_mask(tmp_path / "red.png")


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="broken.jpg: cannot read the image"):
        read_image(bad)
    with pytest.raises(DataError, match="missing.jpg: no such image"):
        read_image(tmp_path / "missing.jpg")


# ----- episodes ---------------------------------------------------------------------------------
def make_fss(root, classes=("bird", "cup"), n=4, size=(40, 48)):
    """FSS-1000 layout: <class>/<N>.jpg + <N>.png, N from 1; object = a box moving with N."""
    h, w = size
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(1, n + 1):
            save_image(folder / f"{k}.jpg", random_image(h, w, seed=10 * c + k))
            save_mask(folder / f"{k}.png", box_mask(h, w, k, k + 20, 2 * k, 2 * k + 20))
    return root


class FixedBox(ReferenceSegmenter):
    """Always predicts rows 0-19 x columns 0-19; records what it was fitted on."""

    name = "fixed"

    def fit(self, ref_images, ref_masks):
        self.fitted = len(ref_images)
        return self

    def segment(self, image):
        return box_mask(*image.shape[:2], 0, 20, 0, 20), 1.0


def test_episode_iou_by_hand(tmp_path):
    root = make_fss(tmp_path, n=10)
    classes = list_classes(root)
    # Numeric order, not lexicographic: 10 comes last.
    assert [p[0].name for p in classes["bird"]][:2] == ["1.jpg", "2.jpg"]
    assert classes["bird"][-1][0].name == "10.jpg"
    method = FixedBox()
    result = evaluate_episodes(method, root, shots=2, show_progress=False)
    assert method.fitted == 2 and result.targets == {"bird": 8, "cup": 8}
    # Target k's box: rows k..k+19, cols 2k..2k+19; the prediction: rows 0..19, cols 0..19.
    inter = sum((20 - k) * (20 - 2 * k) for k in range(3, 11))
    union = sum(2 * 400 - (20 - k) * (20 - 2 * k) for k in range(3, 11))
    assert result.per_class["bird"] == pytest.approx(inter / union)
    assert result.mean_iou == pytest.approx(inter / union)


def test_episode_errors(tmp_path):
    root = make_fss(tmp_path, n=2)
    with pytest.raises(DataError, match="needs at least 3"):
        evaluate_episodes(FixedBox(), root, shots=2, show_progress=False)
    (root / "bird" / "2.png").unlink()
    with pytest.raises(DataError, match="2.jpg: has no mask"):
        list_classes(root)


# ----- command line -----------------------------------------------------------------------------
def test_cli_run_writes_masks_overlays_and_scores(tmp_path, sam_folder, capsys):  # noqa: F811
    ref = save_image(tmp_path / "ref.jpg", random_image(40, 48))
    ref_mask = save_mask(tmp_path / "ref.png", box_mask(40, 48, 5, 30, 10, 40))
    targets = tmp_path / "targets"
    targets.mkdir()
    for k in range(2):
        save_image(targets / f"t{k}.jpg", random_image(36, 50, seed=k + 5))
    out = tmp_path / "out"
    argv = ["refseg", "run", "--ref", str(ref), "--ref-mask", str(ref_mask), str(targets)]
    argv += ["--out", str(out), "--sam", sam_folder, "--min-match", "0"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == 2
    for k in range(2):
        mask = np.array(Image.open(out / f"t{k}.png"))
        assert mask.shape == (36, 50) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(out / f"t{k}_overlay.jpg").size == (50, 36)
    assert "t0.jpg: score" in capsys.readouterr().out


def test_cli_run_cav_sam(tmp_path, sam2_folder):  # noqa: F811
    ref = save_image(tmp_path / "ref.jpg", random_image(40, 48))
    ref_mask = save_mask(tmp_path / "ref.png", box_mask(40, 48, 5, 30, 10, 40))
    target = save_image(tmp_path / "t.jpg", random_image(36, 50, seed=3))
    argv = ["refseg", "run", "--ref", str(ref), "--ref-mask", str(ref_mask), str(target)]
    argv += ["--out", str(tmp_path / "out"), "--method", "cav-sam", "--sam", sam2_folder]
    argv += ["--ttga-steps", "1", "--transition-frames", "2"]
    assert main(argv) == 0
    assert np.array(Image.open(tmp_path / "out" / "t.png")).shape == (36, 50)


def test_cli_errors_are_one_line(tmp_path, sam_folder, capsys):  # noqa: F811
    ref = save_image(tmp_path / "ref.jpg", random_image(40, 48))
    empty = save_mask(tmp_path / "empty.png", np.zeros((40, 48), bool))
    target = save_image(tmp_path / "t.jpg", random_image(30, 30))
    base = ["refseg", "run", "--ref", str(ref), "--out", str(tmp_path / "o"), "--sam", sam_folder]
    assert main(base + ["--ref-mask", str(empty), str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pivotseg: error:") and "empty.png" in err and "\n" not in err
    good = save_mask(tmp_path / "good.png", box_mask(40, 48, 5, 30, 10, 40))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00\x01")
    assert main(base + ["--ref-mask", str(good), str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pivotseg: error:") and "broken.jpg" in err and "\n" not in err
    assert main(base + ["--ref-mask", str(good), "--ref-mask", str(good), str(target)]) == 2
    assert "1 --ref images but 2 --ref-mask" in capsys.readouterr().err


def test_cli_eval_over_episodes(tmp_path, sam_folder, capsys):  # noqa: F811
    root = make_fss(tmp_path / "fss", n=3)
    report = tmp_path / "scores.json"
    argv = ["refseg", "eval", str(root), "--shots", "1", "--sam", sam_folder, "--min-match", "0"]
    argv += ["--json", str(report), "--out", str(tmp_path / "pred")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bird" in out and "cup" in out and "mean" in out
    (data,) = json.loads(report.read_text())["datasets"]  # docs/evaluation.md: percent
    assert set(data["per_class"]) == {"bird", "cup"}
    assert data["frames_per_class"] == {"bird": 2, "cup": 2} and data["frames"] == 4
    assert data["miou"] == pytest.approx(np.mean(list(data["per_class"].values())))
    for name in ("bird", "cup"):  # the printed percentages
        assert f"{name:<4}  IoU {data['per_class'][name]:6.2f}" in out
    assert (tmp_path / "pred" / "cup" / "3.png").exists()
