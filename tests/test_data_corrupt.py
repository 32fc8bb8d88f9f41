"""``pivotseg data corrupt``: adverse-condition copies of a dataset (albumentations)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.data.corrupt import (
    KNOWN,
    MANIFEST,
    build_transform,
    corrupt_dataset,
    frame_seed,
    parse_corruption,
)
from pivotseg.data.formats import build_dataset
from pivotseg.errors import ConfigError, DataError

ALL3 = [f"{name}:3" for name in KNOWN]


@pytest.fixture
def albu():
    return pytest.importorskip(
        "albumentations", reason="albumentations is absent: pip install 'pivotseg[corrupt]'"
    )


def scene(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    """Bright sky over a noisy grey road with a red box: every corruption has work to do."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.int64)
    img[: h // 3], img[h // 3 :] = (210, 220, 235), (90, 90, 95)
    img += rng.integers(-40, 40, (h, w, 3))
    y, x = rng.integers(h // 3, h - 16), rng.integers(0, w - 20)
    img[y : y + 16, x : x + 20] = (180, 30, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_camvid(root: Path, n: int = 4, ext: str = "png", splits=("train", "test")) -> None:
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(scene(i)).save(root / split / f"f{i:03d}.{ext}")
            label = np.random.default_rng(100 + i).integers(0, 12, (72, 96), dtype=np.uint8)
            Image.fromarray(label).save(root / f"{split}annot" / f"f{i:03d}.png")


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_per_corruption_copies_read_back_with_identical_labels(tmp_path, albu, ext):
    src, out = tmp_path / "src", tmp_path / "out"
    write_camvid(src, ext=ext)
    before = digest(src)
    manifest = corrupt_dataset(
        src, "camvid", out, ["fog:3", "night:2"], split="test", progress=False
    )
    assert digest(src) == before  # the source is never written to
    assert manifest["complete"] and manifest["roots"] == {"fog3": "fog3", "night2": "night2"}
    assert sorted(p.name for p in out.iterdir()) == ["corruptions.json", "fog3", "night2"]
    for root in ("fog3", "night2"):
        assert sorted(p.name for p in (out / root).iterdir()) == ["test", "testannot"]
        dataset = build_dataset(out / root, "camvid", "test")
        assert len(dataset) == 4
        for sample in dataset.samples:
            assert sample.image.suffix == f".{ext}"
            source_label = src / "testannot" / sample.label.name
            assert sample.label.read_bytes() == source_label.read_bytes()
            clean = pixels(src / "test" / sample.image.name)
            corrupted = pixels(sample.image)
            assert corrupted.shape == clean.shape
            assert np.abs(corrupted - clean).mean() > 5


def test_every_corruption_changes_the_image_and_keeps_its_size(tmp_path, albu):
    src, out = tmp_path / "src", tmp_path / "out"
    write_camvid(src, n=2, splits=("test",))
    corrupt_dataset(src, "camvid", out, ALL3, progress=False)
    clean = pixels(src / "test/f000.png")
    for name in KNOWN:
        corrupted = pixels(out / f"{name}3/test/f000.png")
        assert corrupted.shape == clean.shape, name
        assert np.abs(corrupted - clean).mean() > 5, name
        # not a blank frame: the scene still varies
        assert corrupted.std() > 10, name


def test_higher_severity_changes_more(albu):
    img = scene(0, h=240, w=320)
    for name in KNOWN:
        change = []
        for severity in (1, 5):
            transform = build_transform(name, severity)
            transform.set_random_seed(7)
            out = transform(image=img)["image"]
            change.append(np.abs(out.astype(np.int64) - img).mean())
        assert change[1] > change[0] + 1, name


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, albu):
    src = tmp_path / "src"
    write_camvid(src, n=2, splits=("test",))
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        corrupt_dataset(src, "camvid", tmp_path / name, ALL3, seed=seed, progress=False)
    a, b, c = (digest(tmp_path / n) for n in "abc")
    assert a == b
    for name in KNOWN:
        for frame in ("f000", "f001"):
            key = f"{name}3/test/{frame}.png"
            assert a[key] != c[key], key  # every transform draws random values
            assert a[f"{name}3/testannot/{frame}.png"] == c[f"{name}3/testannot/{frame}.png"]


def test_manifest_holds_the_exact_transforms(tmp_path, albu):
    src, out = tmp_path / "src", tmp_path / "out"
    write_camvid(src, n=1, splits=("test",))
    corrupt_dataset(src, "camvid", out, ["rain:4", "glare:2"], seed=5, progress=False)
    settings = json.loads((out / MANIFEST).read_text())["settings"]
    assert settings["library"] == "albumentations"
    assert settings["library_version"] == albu.__version__
    assert settings["seed"] == 5 and settings["mode"] == "per-corruption"
    for entry in settings["corruptions"]:
        rebuilt = albu.from_dict({"transform": entry["transform"]})
        rebuilt.set_random_seed(frame_seed(5, entry["label"], "test/f000.png"))
        expected = rebuilt(image=pixels(src / "test/f000.png").astype(np.uint8))["image"]
        written = pixels(out / entry["label"] / "test/f000.png")
        np.testing.assert_array_equal(written, expected)


def test_mixed_mode_is_balanced_recorded_and_matches_per_corruption(tmp_path, albu):
    src = tmp_path / "src"
    write_camvid(src, n=7, splits=("test",))
    chosen = ["fog:3", "snow:3", "motion_blur:3"]
    mixed = corrupt_dataset(src, "camvid", tmp_path / "mix", chosen, mix=True, progress=False)
    corrupt_dataset(src, "camvid", tmp_path / "each", chosen, progress=False)

    assignment = mixed["assignment"]
    assert sorted(assignment) == [f"test/f{i:03d}.png" for i in range(7)]
    counts = [list(assignment.values()).count(label) for label in ("fog3", "snow3", "motion_blur3")]
    assert sorted(counts) == [2, 2, 3] and mixed["counts"] == dict(
        zip(("fog3", "snow3", "motion_blur3"), counts)
    )
    assert json.loads((tmp_path / "mix" / MANIFEST).read_text())["assignment"] == assignment
    assert len(build_dataset(tmp_path / "mix", "camvid", "test")) == 7
    for frame, label in assignment.items():
        mixed_bytes = (tmp_path / "mix" / frame).read_bytes()
        assert mixed_bytes == (tmp_path / "each" / label / frame).read_bytes(), frame

    other = corrupt_dataset(
        src, "camvid", tmp_path / "mix2", chosen, seed=1, mix=True, progress=False
    )
    third = corrupt_dataset(
        src, "camvid", tmp_path / "mix3", chosen, seed=0, mix=True, progress=False
    )
    assert third["assignment"] == assignment and other["assignment"] != assignment


def test_resume_keeps_written_files_and_refuses_other_settings(tmp_path, albu):
    src, out = tmp_path / "src", tmp_path / "out"
    write_camvid(src, n=3, splits=("test",))
    corrupt_dataset(src, "camvid", out, ["rain:3"], progress=False)
    complete = digest(out)
    kept = out / "rain3/test/f000.png"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "rain3/test/f001.png").unlink()
    (out / "rain3/testannot/f002.png").unlink()

    corrupt_dataset(src, "camvid", out, ["rain:3"], progress=False)
    assert digest(out) == complete
    assert kept.stat().st_mtime_ns == kept_mtime  # skipped, not rewritten

    with pytest.raises(DataError, match=r"seed: 0 there, 1 now") as err:
        corrupt_dataset(src, "camvid", out, ["rain:3"], seed=1, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="different settings"):
        corrupt_dataset(src, "camvid", out, ["rain:4"], progress=False)
    assert digest(out) == complete

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        corrupt_dataset(src, "camvid", foreign, ["rain:3"], progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_refuses_an_output_inside_the_source(tmp_path, albu):
    write_camvid(tmp_path, n=1, splits=("test",))
    before = digest(tmp_path)
    for out in (tmp_path, tmp_path / "corrupted"):
        with pytest.raises(ConfigError, match="outside the source"):
            corrupt_dataset(tmp_path, "camvid", out, ["fog:1"], progress=False)
    assert digest(tmp_path) == before


def test_folder_format_copy_keeps_its_classes_file(tmp_path, albu):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    (src / "classes.json").write_text(json.dumps({"classes": ["road", "car"]}))
    for i in range(2):
        Image.fromarray(scene(i)).save(src / "images" / f"x{i}.png")
        Image.fromarray(np.full((72, 96), i, np.uint8)).save(src / "labels" / f"x{i}.png")
    corrupt_dataset(src, "folder", tmp_path / "out", ["night:3"], mix=True, progress=False)
    dataset = build_dataset(tmp_path / "out", "folder")
    assert dataset.classes == ["road", "car"] and len(dataset) == 2
    assert (tmp_path / "out/labels/x1.png").read_bytes() == (src / "labels/x1.png").read_bytes()


def test_nested_cityscapes_layout_reads_back(tmp_path, albu):
    src = tmp_path / "src"
    for split, city in (("val", "lindau"), ("val", "munster"), ("train", "aachen")):
        (src / "leftImg8bit" / split / city).mkdir(parents=True)
        (src / "gtFine" / split / city).mkdir(parents=True)
        Image.fromarray(scene(len(city))).save(
            src / "leftImg8bit" / split / city / f"{city}_0_leftImg8bit.png"
        )
        Image.fromarray(np.full((72, 96), 7, np.uint8)).save(  # 7 = road
            src / "gtFine" / split / city / f"{city}_0_gtFine_labelIds.png"
        )
    corrupt_dataset(src, "cityscapes", tmp_path / "out", ["glare:3"], split="val", progress=False)
    dataset = build_dataset(tmp_path / "out/glare3", "cityscapes")
    assert sorted(s.image.parent.name for s in dataset.samples) == ["lindau", "munster"]
    assert (dataset[0]["label"] == 0).all()  # labelIds still decoded to trainId 0 (road)


@pytest.mark.parametrize(
    "text, message",
    [
        ("haze:3", "unknown corruption 'haze'; known corruptions: " + ", ".join(KNOWN)),
        ("fog:7", "severity must be an integer 1-5"),
        ("fog:0", "severity must be an integer 1-5"),
        ("fog:x", "severity must be an integer 1-5"),
        ("fog", "has no severity"),
    ],
)
def test_bad_corruption_is_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_corruption(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_unknown_corruption_lists_the_known_ones(tmp_path, capsys):
    write_camvid(tmp_path / "src", n=1, splits=("test",))
    argv = ["data", "corrupt", str(tmp_path / "src"), "--format", "camvid"]
    code = main([*argv, "--out", str(tmp_path / "out"), "--corruption", "smog:2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert all(name in err for name in KNOWN) and "smog" in err
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_mixed_copy(tmp_path, capsys, albu):
    write_camvid(tmp_path / "src", n=2)
    argv = ["data", "corrupt", str(tmp_path / "src"), "--format", "camvid", "--split", "test"]
    argv += ["--out", str(tmp_path / "out"), "--mix", "--quiet"]
    assert main([*argv, "--corruption", "fog:2", "--corruption", "rain:2"]) == 0
    assert "2 frames, one corruption each (fog2 1, rain2 1)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "corruptions.json",
        "test",
        "testannot",
    ]


def test_missing_albumentations_names_the_extra(tmp_path, monkeypatch):
    write_camvid(tmp_path / "src", n=1, splits=("test",))
    monkeypatch.setitem(sys.modules, "albumentations", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pivotseg\[corrupt\]'"):
        corrupt_dataset(tmp_path / "src", "camvid", tmp_path / "out", ["fog:3"])
