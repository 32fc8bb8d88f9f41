"""Dataset readers: real samples from ../shared and tiny files written here with known values."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pivotseg.data import FORMATS, build_dataset, get_format
from pivotseg.data.io import read_label, read_png16_rgb
from pivotseg.data.taxonomy import (
    CITYSCAPES_CLASSES,
    MAPILLARY_V12_CLASSES,
    MAPILLARY_V12_PALETTE,
    MAPILLARY_V20_CLASSES,
    MAPILLARY_V20_PALETTE,
)
from pivotseg.errors import ConfigError, DataError
from tests.conftest import require_shared

# ---------------------------------------------------------------- helpers


def save_rgb(path: Path, h: int, w: int, seed: int = 0, ext_format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=ext_format)
    return path


def save_ids(path: Path, ids, palette: bool = False) -> Path:
    """Single-channel id PNG; ``palette=True`` writes a palette ("P") PNG as GTA5 does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(ids, dtype=np.uint8))
    if palette:
        img = Image.frombytes("P", img.size, img.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)
    return path


def png16_rgb(path: Path, array: np.ndarray) -> Path:
    """Write a 16-bit RGB PNG by hand (Pillow cannot), rows alternating PNG filters 0/1/2."""
    h, w, _ = array.shape
    rows, prev = [], np.zeros(w * 6, np.int64)
    for i in range(h):
        cur = np.frombuffer(array[i].astype(">u2").tobytes(), np.uint8).astype(np.int64)
        kind = i % 3
        if kind == 0:
            data = cur
        elif kind == 1:  # Sub: minus the byte one pixel (6 bytes) to the left
            data = cur - np.concatenate([np.zeros(6, np.int64), cur[:-6]])
        else:  # Up: minus the byte above
            data = cur - prev
        rows.append(bytes([kind]) + (data % 256).astype(np.uint8).tobytes())
        prev = cur

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    return path


def labels_of(ds) -> list[np.ndarray]:
    return [ds[i]["label"] for i in range(len(ds))]


# ---------------------------------------------------------------- registry


def test_formats_are_the_agreed_names():
    assert set(FORMATS) == {
        "cityscapes", "gta5", "synthia", "bdd100k", "acdc", "mapillary_v1.2", "mapillary_v2.0",
        "camvid", "carlascapes", "idd_lite", "loveda", "potsdam", "vaihingen", "folder",
    }  # fmt: skip


def test_unknown_format_suggests_the_closest(tmp_path):
    with pytest.raises(DataError, match="did you mean 'cityscapes'"):
        build_dataset(tmp_path, "cityscape")


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match="condition"):
        get_format("camvid", condition="fog")


# ---------------------------------------------------------------- Cityscapes

CS_LABELIDS = np.array([[7, 8, 11, 12, 13, 17], [19, 20, 21, 22, 23, 24], [25, 26, 27, 28, 31, 32]])
CS_TRAINIDS = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]])


def write_cityscapes(root: Path, split="train", city="aachen", name="aachen_000000_000019"):
    save_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 3, 6)
    save_ids(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", CS_LABELIDS)


def test_cityscapes_labelids_map_to_trainids(tmp_path):
    write_cityscapes(tmp_path)
    ds = build_dataset(tmp_path, "cityscapes", "train")
    item = ds[0]
    np.testing.assert_array_equal(item["label"], CS_TRAINIDS)
    assert item["label"].dtype == np.int64 and item["image"].dtype == np.uint8
    assert item["meta"]["size"] == (3, 6) and item["meta"]["domain"] == "cityscapes"
    assert ds.classes == CITYSCAPES_CLASSES and len(ds.palette) == 19


def test_cityscapes_ignored_labelids_and_out_of_range(tmp_path):
    write_cityscapes(tmp_path)
    label = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    save_ids(label, [[0, 1, 6, 9, 10, 33], [14, 15, 16, 18, 29, 30], [255, 4, 5, 2, 3, 255]])
    ds = build_dataset(tmp_path, "cityscapes")
    expected = [[255] * 5 + [18], [255] * 6, [255] * 6]
    np.testing.assert_array_equal(ds[0]["label"], expected)
    save_ids(label, [[7, 40, 7, 7, 7, 7]] * 3)
    with pytest.raises(DataError, match="label values 40 .*aachen|aachen.*label values 40"):
        ds[0]


def test_cityscapes_prefers_labeltrainids_when_present(tmp_path):
    write_cityscapes(tmp_path)
    base = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_"
    save_ids(Path(f"{base}labelTrainIds.png"), np.full((3, 6), 10))
    assert (build_dataset(tmp_path, "cityscapes")[0]["label"] == 10).all()
    ds = build_dataset(tmp_path, "cityscapes", label_kind="labelIds")
    np.testing.assert_array_equal(ds[0]["label"], CS_TRAINIDS)


def test_cityscapes_splits(tmp_path):
    write_cityscapes(tmp_path, "train")
    write_cityscapes(tmp_path, "val", "lindau", "lindau_000000_000019")
    assert len(build_dataset(tmp_path, "cityscapes")) == 2
    val = build_dataset(tmp_path, "cityscapes", "val")
    assert len(val) == 1 and val[0]["meta"]["split"] == "val"
    with pytest.raises(DataError, match="no split 'test'.*found: train, val"):
        build_dataset(tmp_path, "cityscapes", "test")


def test_cityscapes_fixture_labelids_agree_with_its_labeltrainids():
    # The fixture's two label files were resized separately, so ~0.2% of boundary pixels
    # differ; for every labelId the official trainId file's majority value is our table's.
    root = require_shared("data", "fixtures", "cityscapes")
    item = build_dataset(root, "cityscapes", "val", label_kind="labelIds")[0]
    label_ids = np.asarray(Image.open(item["meta"]["label_path"]))
    official = np.asarray(
        Image.open(item["meta"]["label_path"].replace("labelIds", "labelTrainIds"))
    )
    assert (item["label"] == official).mean() > 0.995
    for value in np.unique(label_ids):
        ours = np.unique(item["label"][label_ids == value])
        majority = np.bincount(official[label_ids == value]).argmax()
        assert ours.tolist() == [majority], value
    assert item["image"].shape == (128, 256, 3)


# ---------------------------------------------------------------- GTA5, SYNTHIA, BDD100K, ACDC


def test_gta5_palette_labels(tmp_path):
    save_rgb(tmp_path / "images/00001.png", 3, 6)
    save_ids(tmp_path / "labels/00001.png", CS_LABELIDS, palette=True)
    assert Image.open(tmp_path / "labels/00001.png").mode == "P"
    np.testing.assert_array_equal(build_dataset(tmp_path, "gta5")[0]["label"], CS_TRAINIDS)


def test_read_png16_recovers_full_values(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    path = png16_rgb(tmp_path / "x.png", values)
    np.testing.assert_array_equal(read_png16_rgb(path), values)
    np.testing.assert_array_equal(read_label(path), values)


def test_synthia_first_channel_ids(tmp_path):
    ids = np.array([[3, 4, 2, 21, 5, 7], [15, 9, 6, 1, 10, 17], [8, 19, 12, 11, 16, 0]])
    gt = np.stack([ids, np.full_like(ids, 1000), np.zeros_like(ids)], -1)
    png16_rgb(tmp_path / "GT/LABELS/0000001.png", gt)
    save_rgb(tmp_path / "RGB/0000001.png", 3, 6)
    label = build_dataset(tmp_path, "synthia")[0]["label"]
    expected = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 10, 11, 12], [13, 15, 17, 18, 255, 255]]
    np.testing.assert_array_equal(label, expected)
    gt[0, 0, 0] = 300
    png16_rgb(tmp_path / "GT/LABELS/0000001.png", gt)
    with pytest.raises(DataError, match="300"):
        build_dataset(tmp_path, "synthia")[0]


def test_bdd100k_trainid_masks(tmp_path):
    save_rgb(tmp_path / "images/10k/val/abc.jpg", 4, 4)
    mask = np.array([[0, 18, 255, 5]] * 4)
    save_ids(tmp_path / "labels/sem_seg/masks/val/abc.png", mask)
    ds = build_dataset(tmp_path, "bdd100k", "val")
    np.testing.assert_array_equal(ds[0]["label"], mask)
    save_ids(tmp_path / "labels/sem_seg/masks/val/abc.png", np.full((4, 4), 19))
    with pytest.raises(DataError, match="19"):
        ds[0]


def write_acdc(root: Path, cond: str, split: str, name: str, value: int):
    seq = "GOPR0475"
    save_rgb(root / "rgb_anon" / cond / split / seq / f"{name}_rgb_anon.png", 4, 4)
    gt = root / "gt" / cond / split / seq / f"{name}_gt_labelTrainIds.png"
    save_ids(gt, np.full((4, 4), value))


def test_acdc_conditions_are_domains(tmp_path):
    write_acdc(tmp_path, "fog", "val", "GOPR0475_frame_000041", 0)
    write_acdc(tmp_path, "night", "val", "GOPR0475_frame_000041", 10)
    write_acdc(tmp_path, "night", "train", "GOPR0475_frame_000050", 10)
    both = build_dataset(tmp_path, "acdc", "val")
    assert both.domain == "acdc" and len(both) == 2
    assert sorted(both[i]["meta"]["domain"] for i in range(2)) == ["fog", "night"]
    night = build_dataset(tmp_path, "acdc", "night/val")
    assert night.domain == "night" and len(night) == 1 and (night[0]["label"] == 10).all()
    fog = build_dataset(tmp_path, "acdc", "val", condition="fog")
    assert fog.domain == "fog" and (fog[0]["label"] == 0).all()
    assert len(build_dataset(tmp_path, "acdc")) == 3
    with pytest.raises(DataError, match="no ACDC condition 'snow'"):
        build_dataset(tmp_path, "acdc", "val", condition="snow")


# ---------------------------------------------------------------- Mapillary


def test_mapillary_palettes_match_the_fixture_pngs():
    root = require_shared("data", "fixtures", "mapillary")
    for version, palette in (("v1.2", MAPILLARY_V12_PALETTE), ("v2.0", MAPILLARY_V20_PALETTE)):
        png = Image.open(next((root / version).glob("*.png")))
        embedded = np.array(png.getpalette()).reshape(-1, 3)[: len(palette)]
        np.testing.assert_array_equal(embedded, palette)
    assert len(MAPILLARY_V12_CLASSES) == 66 and len(MAPILLARY_V20_CLASSES) == 124


def test_mapillary_fixture_both_versions():
    root = require_shared("data", "fixtures", "mapillary")
    # fixture ids: v1.2 17 Building, 44 Street Light, 45 Pole; v2.0 27, 84, 85 the same classes
    for fmt, table in (
        ("mapillary_v1.2", {17: 2, 44: 5, 45: 5}),
        ("mapillary_v2.0", {27: 2, 84: 5, 85: 5}),
    ):
        item = build_dataset(root, fmt)[0]
        raw = np.asarray(Image.open(item["meta"]["label_path"]))
        expected = np.vectorize(table.get)(raw)
        np.testing.assert_array_equal(item["label"], expected)
        assert item["image"].shape == (100, 100, 3)


def test_mapillary_official_layout_and_colour_labels(tmp_path):
    save_rgb(tmp_path / "validation/images/a.jpg", 2, 3)
    colours = np.array(
        [[(128, 64, 128), (70, 70, 70), (0, 0, 0)], [(220, 20, 60), (255, 0, 0), (250, 170, 30)]],
        dtype=np.uint8,
    )  # Road, Building, Unlabeled / Person, Bicyclist, Traffic Light
    label = tmp_path / "validation/v1.2/labels/a.png"
    label.parent.mkdir(parents=True)
    Image.fromarray(colours).save(label)
    ds = build_dataset(tmp_path, "mapillary_v1.2", "val")
    np.testing.assert_array_equal(ds[0]["label"], [[0, 2, 255], [11, 12, 6]])
    Image.fromarray(np.full((2, 3, 3), 7, np.uint8)).save(label)
    with pytest.raises(DataError, match="not in the format's palette"):
        ds[0]


def test_mapillary_v20_shared_colours(tmp_path):
    # (110,110,110) is Road Shoulder (ignored) and Service Lane (road): ambiguous -> ignore;
    # (153,153,153) is Pole and Pole Group, both pole.
    save_rgb(tmp_path / "images/a.jpg", 1, 3)
    (tmp_path / "v2.0").mkdir()
    rgb = np.array([[(110, 110, 110), (153, 153, 153), (128, 64, 128)]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "v2.0/a.png")
    np.testing.assert_array_equal(
        build_dataset(tmp_path, "mapillary_v2.0")[0]["label"], [[255, 5, 0]]
    )


# ---------------------------------------------------------------- CamVid, CarlaScapes


def test_camvid_shared_day_splits():
    root = require_shared("data", "camvid_day")
    sizes = {s: len(build_dataset(root, "camvid", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 305, "val": 101, "test": 171}
    ds = build_dataset(root, "camvid", "train")
    item = ds[0]
    raw = np.asarray(Image.open(item["meta"]["label_path"]))
    np.testing.assert_array_equal(item["label"], np.where(raw == 11, 255, raw))
    assert item["image"].shape == (360, 480, 3) and item["meta"]["path"].endswith(".jpg")
    assert ds.classes[0] == "Sky" and ds.classes[-1] == "Bicyclist"


def test_camvid_pairs_jpg_with_png_and_rejects_20(tmp_path):
    save_rgb(tmp_path / "train/0001TP_006690.jpg", 2, 6)
    save_ids(tmp_path / "trainannot/0001TP_006690.png", [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    ds = build_dataset(tmp_path, "camvid", "train")
    np.testing.assert_array_equal(ds[0]["label"], [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 255]])
    save_ids(tmp_path / "trainannot/0001TP_006690.png", [[0, 20, 2, 3, 4, 5]] * 2)
    with pytest.raises(DataError, match=r"0001TP_006690\.png: label values 20 "):
        ds[0]


def test_carlascapes_shared_frames():
    root = require_shared("data", "carlascapes")
    ds = build_dataset(root, "carlascapes")
    assert len(ds) == 4 and ds.domain == "carlascapes"
    item = ds[0]
    raw = np.asarray(Image.open(item["meta"]["label_path"])).astype(np.int64)
    expected = np.where((raw >= 1) & (raw <= 19), raw - 1, 255)
    np.testing.assert_array_equal(item["label"], expected)
    assert item["image"].shape == (1024, 2048, 3)


def test_carlascapes_tmp_values(tmp_path):
    save_rgb(tmp_path / "t_0001_img.jpg", 1, 6, ext_format="JPEG")
    save_ids(tmp_path / "t_0001_labelIds.png", [[0, 1, 19, 20, 28, 255]])
    ds = build_dataset(tmp_path, "carlascapes", domain="sim")
    np.testing.assert_array_equal(ds[0]["label"], [[255, 0, 18, 255, 255, 255]])
    assert ds.domain == "sim"


# ---------------------------------------------------------------- LoveDA, ISPRS


def test_loveda_fixture():
    root = require_shared("data", "fixtures", "loveda")
    ds = build_dataset(root, "loveda")
    assert len(ds) == 3
    item = ds[0]
    raw = np.asarray(Image.open(item["meta"]["label_path"])).astype(np.int64)
    np.testing.assert_array_equal(item["label"], np.where(raw == 0, 255, raw - 1))


def test_loveda_tmp_values(tmp_path):
    save_rgb(tmp_path / "img_dir/train/1.png", 1, 4)
    save_ids(tmp_path / "ann_dir/train/1.png", [[0, 1, 7, 4]])
    ds = build_dataset(tmp_path, "loveda", "train")
    np.testing.assert_array_equal(ds[0]["label"], [[255, 0, 6, 3]])
    assert ds.classes[6] == "agricultural"
    save_ids(tmp_path / "ann_dir/train/1.png", [[0, 1, 8, 4]])
    with pytest.raises(DataError, match="8"):
        ds[0]


@pytest.mark.parametrize("name", ["potsdam", "vaihingen"])
def test_isprs_fixture_boundary_is_ignored(name):
    root = require_shared("data", "fixtures", name)
    item = build_dataset(root, name)[0]
    raw = np.asarray(Image.open(item["meta"]["label_path"])).astype(np.int64)
    np.testing.assert_array_equal(item["label"], np.where(raw == 0, 255, raw - 1))
    assert item["image"].shape == (512, 512, 3)


def test_isprs_tmp_clutter_is_6(tmp_path):
    save_rgb(tmp_path / "img_dir/val/t.png", 1, 4)
    save_ids(tmp_path / "ann_dir/val/t.png", [[0, 1, 6, 255]])
    ds = build_dataset(tmp_path, "potsdam", "val")
    np.testing.assert_array_equal(ds[0]["label"], [[255, 0, 5, 255]])
    assert ds.classes[5] == "clutter"
    save_ids(tmp_path / "ann_dir/val/t.png", [[0, 1, 7, 255]])
    with pytest.raises(DataError, match="7"):
        ds[0]


# ---------------------------------------------------------------- folder


def test_folder_with_json_mapping(tmp_path):
    save_rgb(tmp_path / "images/a.jpg", 1, 4)
    save_ids(tmp_path / "labels/a.png", [[10, 20, 0, 255]])
    spec = {"classes": ["crop", "weed"], "mapping": {"10": 0, "20": 1, "0": 255}}
    (tmp_path / "classes.json").write_text(json.dumps(spec))
    ds = build_dataset(tmp_path, "folder", domain="farm")
    np.testing.assert_array_equal(ds[0]["label"], [[0, 1, 255, 255]])
    assert ds.classes == ["crop", "weed"] and ds.domain == "farm" and len(ds.palette) == 2
    save_ids(tmp_path / "labels/a.png", [[10, 30, 0, 255]])
    with pytest.raises(DataError, match="30"):
        ds[0]


def test_folder_with_yaml_mapping_elsewhere_and_classes_kwarg(tmp_path):
    save_rgb(tmp_path / "data/images/a.png", 1, 3)
    save_ids(tmp_path / "data/labels/a.png", [[5, 6, 7]])
    (tmp_path / "map.yaml").write_text("classes: [a, b]\nmapping: {5: 1, 6: 0, 7: 255}\n")
    ds = build_dataset(tmp_path / "data", "folder", mapping=tmp_path / "map.yaml")
    np.testing.assert_array_equal(ds[0]["label"], [[1, 0, 255]])
    save_ids(tmp_path / "data/labels/a.png", [[0, 1, 255]])
    ds = build_dataset(tmp_path / "data", "folder", classes=["x", "y"])
    np.testing.assert_array_equal(ds[0]["label"], [[0, 1, 255]])
    with pytest.raises(DataError, match="needs class names"):
        build_dataset(tmp_path / "data", "folder")
    (tmp_path / "bad.json").write_text('{"classes": ["a"], "mapping": {"1": 4}}')
    with pytest.raises(ConfigError, match="outside the 1 classes"):
        build_dataset(tmp_path / "data", "folder", mapping=tmp_path / "bad.json")


# ---------------------------------------------------------------- bad input


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        build_dataset(tmp_path / "nope", "camvid")
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(DataError, match="no camvid images found"):
        build_dataset(tmp_path, "camvid")


def test_unpaired_image_is_named(tmp_path):
    save_rgb(tmp_path / "train/a.jpg", 2, 2)
    save_rgb(tmp_path / "train/b.jpg", 2, 2)
    save_ids(tmp_path / "trainannot/a.png", np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"b\.jpg: image has no label"):
        build_dataset(tmp_path, "camvid", "train")


def test_corrupt_missing_and_mismatched_files_raise_with_path(tmp_path):
    for name in ("a", "b", "c"):
        save_rgb(tmp_path / f"train/{name}.jpg", 4, 4, ext_format="JPEG")
        save_ids(tmp_path / f"trainannot/{name}.png", np.zeros((4, 4)))
    ds = build_dataset(tmp_path, "camvid", "train")
    data = (tmp_path / "train/a.jpg").read_bytes()
    (tmp_path / "train/a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"a\.jpg: cannot read the image"):
        ds[0]
    (tmp_path / "trainannot/b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png: label file is missing"):
        ds[1]
    save_ids(tmp_path / "trainannot/c.png", np.zeros((4, 5)))
    with pytest.raises(DataError, match=r"c\.png: label is 5x4 but its image .*c\.jpg is 4x4"):
        ds[2]
