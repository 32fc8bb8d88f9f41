"""``pivotseg data check|stats`` on good and broken datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pivotseg.cli.main import main
from tests.conftest import require_shared


def write_camvid(root: Path, names=("a", "b", "c")) -> None:
    for i, name in enumerate(names):
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "trainannot").mkdir(parents=True, exist_ok=True)
        rgb = np.random.default_rng(i).integers(0, 256, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"train/{name}.jpg", quality=95)
        label = np.zeros((4, 5), np.uint8)
        label[0, :] = 3  # 5 Road pixels
        label[1, 0] = 11  # 1 void pixel
        Image.fromarray(label).save(root / f"trainannot/{name}.png")


def test_check_good_dataset(tmp_path, capsys):
    write_camvid(tmp_path)
    assert main(["data", "check", str(tmp_path), "--format", "camvid", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 images, 3 labels, 3 pairs" in out and "no problems found" in out
    # per image: 5 Road, 14 Sky, 1 void
    rows = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("  ")}
    assert rows["Road"] == "15" and rows["Sky"] == "42" and rows["Car"] == "0"
    assert rows["(ignore)"] == "3"


def test_check_reports_every_problem_at_once(tmp_path, capsys):
    write_camvid(tmp_path, names=("good", "trunc", "twenty", "small", "lonely"))
    data = (tmp_path / "train/trunc.jpg").read_bytes()
    (tmp_path / "train/trunc.jpg").write_bytes(data[: len(data) // 2])
    bad = np.zeros((4, 5), np.uint8)
    bad[2, 2] = 20
    Image.fromarray(bad).save(tmp_path / "trainannot/twenty.png")
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(tmp_path / "trainannot/small.png")
    (tmp_path / "trainannot/lonely.png").unlink()
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "trainannot/orphan.png")

    code = main(
        ["data", "check", str(tmp_path), "--format", "camvid", "--split", "train", "--quiet"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "unreadable image" in out and "trunc.jpg" in out
    assert "values outside classes" in out and "twenty.png" in out and "values 20 " in out
    assert "size mismatch" in out and "small.png" in out and "label 5x3, image small.jpg 5x4" in out
    assert "unpaired image" in out and "lonely.jpg" in out
    assert "unpaired label" in out and "orphan.png" in out
    assert "5 problems" in out


def test_check_empty_folder_and_unknown_format(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path), "--format", "loveda", "--quiet"]) == 1
    assert "empty" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path), "--format", "lovedaa", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset format" in err and "Traceback" not in err


def test_stats_prints_frequencies(tmp_path, capsys):
    write_camvid(tmp_path, names=("a",))
    assert main(["data", "stats", str(tmp_path), "--format", "camvid", "--quiet"]) == 0
    out = capsys.readouterr().out
    # 14 Sky and 5 Road of 19 labelled pixels
    assert "Sky" in out and f"{100 * 14 / 19:6.2f}%" in out
    assert "Road" in out and f"{100 * 5 / 19:6.2f}%" in out


def test_check_shared_camvid_day(capsys):
    root = require_shared("data", "camvid_day")
    assert (
        main(["data", "check", str(root), "--format", "camvid", "--split", "val", "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert "101 images, 101 labels, 101 pairs" in out and "Bicyclist" in out
