"""Images and dataset folders that used to be read wrongly or reported untruthfully (issue #13)."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.data import build_dataset
from pivotseg.data.io import read_image
from pivotseg.data.transforms import train_transforms
from pivotseg.errors import DataError
from tests.test_cli_data import write_camvid


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour): grey or RGB."""
    h, w = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def random16(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, shape).astype(np.uint16)


def test_16_bit_images_read_as_their_high_byte(tmp_path):
    grey, rgb = random16((6, 7)), random16((6, 7, 3), seed=1)
    write_png16(tmp_path / "grey.png", grey)
    write_png16(tmp_path / "rgb.png", rgb)
    Image.fromarray(grey).save(tmp_path / "grey.tif")
    high = (grey >> 8).astype(np.uint8)
    for name in ("grey.png", "grey.tif"):
        image = read_image(tmp_path / name)
        assert image.dtype == np.uint8 and image.shape == (6, 7, 3)
        assert all(np.array_equal(image[..., c], high) for c in range(3)), name
    assert np.array_equal(read_image(tmp_path / "rgb.png"), (rgb >> 8).astype(np.uint8))


def test_reference_segmentation_reads_16_bit_images_like_the_datasets(tmp_path):
    from pivotseg.tasks.refseg.images import read_image as read_reference

    grey = random16((6, 7), seed=2)
    write_png16(tmp_path / "ref.png", grey)
    assert np.array_equal(
        read_reference(tmp_path / "ref.png")[..., 0], (grey >> 8).astype(np.uint8)
    )


def test_datasets_read_16_bit_images_correctly(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    grey = random16((8, 9))
    write_png16(tmp_path / "images" / "a.png", grey)
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "labels" / "a.png")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["x", "y"]}))
    item = build_dataset(tmp_path, "folder")[0]
    assert np.array_equal(item["image"][..., 1], (grey >> 8).astype(np.uint8))


def test_16_bit_image_holding_12_bit_data_is_refused(tmp_path):
    write_png16(tmp_path / "raw.png", np.full((4, 4, 3), 4095, np.uint16))
    with pytest.raises(DataError, match=r"raw\.png: 16-bit image whose values all stay below 4096"):
        read_image(tmp_path / "raw.png")
    write_png16(tmp_path / "bright.png", np.full((4, 4, 3), 4096, np.uint16))
    assert (read_image(tmp_path / "bright.png") == 16).all()


def test_check_names_every_planted_fault(tmp_path, capsys):
    """The battery of tests/test_cli_data.py plus 16-bit images and a broken link."""
    names = ("good", "trunc", "twenty", "small", "lonely", "gone", "deep", "dark")
    write_camvid(tmp_path, names=names)
    data = (tmp_path / "train/trunc.jpg").read_bytes()
    (tmp_path / "train/trunc.jpg").write_bytes(data[: len(data) // 2])
    bad = np.zeros((4, 5), np.uint8)
    bad[2, 2] = 20
    Image.fromarray(bad).save(tmp_path / "trainannot/twenty.png")
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(tmp_path / "trainannot/small.png")
    (tmp_path / "trainannot/lonely.png").unlink()
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "trainannot/orphan.png")
    (tmp_path / "train/gone.jpg").unlink()
    (tmp_path / "train/gone.jpg").symlink_to(tmp_path / "elsewhere/gone.jpg")
    for name, top in (("deep", 65535), ("dark", 3000)):
        (tmp_path / f"train/{name}.jpg").unlink()
        write_png16(tmp_path / f"train/{name}.png", np.full((4, 5, 3), top, np.uint16))

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
    link = f"broken link: {tmp_path / 'train/gone.jpg'}: points to {tmp_path}/elsewhere/gone.jpg"
    assert link in out
    assert f"unpaired label: {tmp_path / 'trainannot/gone.png'}" in out
    assert "or its partner is behind a broken link reported above" in out
    assert f"low-range 16-bit image: {tmp_path / 'train/dark.png'}" in out
    assert "16-bit images, read as 8-bit (the high byte of each value): 1" in out
    assert "deep.png" not in out  # a full-range 16-bit image is no problem
    assert "8 problems" in out


@pytest.fixture
def deny(monkeypatch, request):
    """Make a folder unlistable, also for root (whom chmod does not stop)."""

    def make(folder: Path) -> None:
        folder.chmod(0)
        request.addfinalizer(lambda: folder.chmod(0o755))
        real_scandir, real_access = os.scandir, os.access

        def scandir(path="."):
            if isinstance(path, (str, os.PathLike)) and Path(path) == folder:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        def access(path, mode, **kwargs):
            return Path(path) != folder and real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(os, "access", access)

    return make


def test_check_names_an_unreadable_folder(tmp_path, capsys, deny):
    write_camvid(tmp_path)
    deny(tmp_path / "train")
    code = main(["data", "check", str(tmp_path), "--format", "camvid", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"unreadable folder: {tmp_path / 'train'}: cannot list it (Permission denied)" in out
    assert "chmod -R a+rX" in out
    unpaired = [line for line in out.splitlines() if line.startswith("  unpaired label")]
    assert len(unpaired) == 3
    assert all("or its partner is in an unreadable folder reported above" in u for u in unpaired)


def item(h: int, w: int) -> dict:
    image = np.zeros((h, w, 3), np.uint8)
    label = np.zeros((h, w), np.int64)
    return {"image": image, "label": label, "meta": {"path": "img.png", "index": 0, "epoch": 0}}


def test_crop_larger_than_the_images_warns_once():
    transform = train_transforms(64, scales=[20, 30], seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = transform(item(30, 40))
        transform(item(30, 40))
    assert tuple(out["image"].shape) == (3, 64, 64)  # still padded: the warning changes nothing
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "data.crop_size [64, 64]" in message and "img.png is 30x40" in message
    assert "at most 30x40 after resizing" in message and "lower data.crop_size" in message
    # a crop the largest scale covers (Rein's recipe pads only at small scales) stays silent
    fitting = train_transforms(32, scales=[32, 40], seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fitting(item(40, 48))
    assert not caught
