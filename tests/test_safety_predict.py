"""``pivotseg predict`` never loses, garbles or silently replaces output (issue #13, item 4)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.config import config_from_dict, save_config
from pivotseg.errors import ConfigError, DataError
from pivotseg.segmenter import build_segmenter, load_segmenter
from pivotseg.tasks.dgss import evaluate
from pivotseg.tasks.dgss.predict import output_names, predict, upsampled_argmax
from tests.helpers import TINY_HEAD_ARGS, tiny_vit_config
from tests.test_dgss import CLASSES, make_folder_dataset

MODEL = {
    "num_classes": 3,
    "class_names": CLASSES,
    "backbone": "dinov2",
    "backbone_config": tiny_vit_config(),  # patch 8; the FPN's coarsest level is stride 32
    "method": "frozen",
    "head": "fpn",
    "head_args": dict(TINY_HEAD_ARGS["fpn"]),
}


def make_model(folder: Path, **data) -> Path:
    """A random tiny segmenter saved with a run config whose ``data`` section is ``data``."""
    torch.manual_seed(0)
    build_segmenter(dict(MODEL)).save(folder)
    cfg = config_from_dict({"model": dict(MODEL), "data": data, "run_dir": str(folder)})
    save_config(cfg, folder / "config.yaml")
    return folder


def write_image(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def input_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The (h, w) of every image the loaded model is called on."""
    seen: list[tuple[int, int]] = []
    real = load_segmenter

    def spying(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
        return model

    monkeypatch.setattr("pivotseg.segmenter.load_segmenter", spying)
    return seen


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_images_sharing_a_stem_get_their_own_png(model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shapes = {"a.jpg": (40, 48), "a.png": (36, 52), "b.png": (44, 40)}
    for i, (name, (h, w)) in enumerate(shapes.items()):
        write_image(images / name, h, w, seed=i)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(images), "--out", str(out)]) == 0
    assert "wrote 3 PNGs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]
    for name, (h, w) in shapes.items():
        target = out / (f"{name}.png" if name.startswith("a.") else "b.png")
        assert labels_of(target).shape == (h, w)
    # each PNG is the prediction of its own image: alone in a folder, a.png gives the same map
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "a.png").write_bytes((images / "a.png").read_bytes())
    written = predict(model, alone, tmp_path / "alone_out")
    assert np.array_equal(labels_of(written[0]), labels_of(out / "a.png.png"))


def test_output_names_never_meet():
    files = [Path(n) for n in ("a.jpg", "a.png", "a.jpg.png", "B.png", "b.jpg", "c.tif")]
    names = output_names(files)
    assert names == ["a.jpg.png", "a.png.png", "a.jpg.png.png", "B.png.png", "b.jpg.png", "c.png"]
    assert len({n.casefold() for n in names}) == len(files)


def test_existing_outputs_are_kept_unless_overwrite(model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png", 40, 48)
    write_image(images / "b.png", 40, 48, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"my own file")
    assert main(["predict", str(model), str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "1 of the 2 PNGs exist already (b.png)" in err and "--overwrite" in err
    assert (out / "b.png").read_bytes() == b"my own file" and not (out / "a.png").exists()
    args = ["predict", str(model), str(images), "--out", str(out), "--overwrite"]
    assert main(args) == 0
    assert labels_of(out / "b.png").shape == (40, 48)


def test_predictions_never_replace_the_images(model, tmp_path):
    write_image(tmp_path / "a.png", 40, 48)
    before = (tmp_path / "a.png").read_bytes()
    with pytest.raises(ConfigError, match="would replace this input image"):
        predict(model, tmp_path, tmp_path, overwrite=True)
    assert (tmp_path / "a.png").read_bytes() == before


def test_predict_uses_the_runs_eval_resize_and_agrees_with_eval(tmp_path, monkeypatch):
    data = make_folder_dataset(tmp_path / "tgt", {"val": 3}, seed=1)  # 40x48 images
    run = make_model(tmp_path / "run", eval_resize_short=36)
    seen = input_sizes(monkeypatch)
    out = tmp_path / "out"
    written = predict(run, data / "images" / "val", out, mode="whole")
    assert seen == [(36, 43)] * 3  # mmcv rounding of 48 * 36 / 40
    correct = total = 0
    for path in written:
        pred = labels_of(path).astype(np.int64)
        truth = np.asarray(Image.open(data / "labels" / "val" / path.name))
        assert pred.shape == truth.shape == (40, 48)
        valid = truth != 255
        correct += int((pred[valid] == truth[valid]).sum())
        total += int(valid.sum())
    record = evaluate(run, [f"tgt={data}:folder:val"], mode="whole", verbose=False)
    assert 100 * correct / total == pytest.approx(record["targets"]["tgt"]["acc"], abs=1e-9)


def test_large_images_run_at_the_capped_size(tmp_path, monkeypatch):
    run = make_model(tmp_path / "run", max_size=64)  # no eval resize: the training cap applies
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "big.jpg", 120, 180)
    seen = input_sizes(monkeypatch)
    written = predict(run, images, tmp_path / "out")
    assert seen == [(43, 64)] and labels_of(written[0]).shape == (120, 180)
    seen.clear()
    predict(run, images, tmp_path / "full", max_long=0)  # 0 switches the cap off
    assert seen == [(120, 180)]


@pytest.mark.parametrize(
    "shape, size", [((5, 13, 17), (101, 77)), ((19, 37, 50), (300, 413)), ((4, 50, 40), (37, 29))]
)
def test_strip_upsampling_matches_one_piece(monkeypatch, shape, size):
    logits = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    module = sys.modules["pivotseg.tasks.dgss.predict"]  # the package exports the function
    monkeypatch.setattr(module, "UPSAMPLE_CHUNK", shape[0] * size[1] * 6)  # 6 rows per strip
    assert torch.equal(upsampled_argmax(logits, size).long(), full.argmax(1)[0])


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (20, 20), (31, 90)])
def test_tiny_images_are_enlarged_not_a_traceback(model, tmp_path, monkeypatch, size):
    write_image(tmp_path / "tiny.png", *size)
    seen = input_sizes(monkeypatch)
    written = predict(model, tmp_path, tmp_path / "out", mode="whole")
    pred = labels_of(written[0])
    assert pred.shape == size and set(np.unique(pred)) <= {0, 1, 2}
    assert min(seen[0]) == 32  # the stride-32 pyramid level needs 32 pixels


def test_slide_window_below_the_model_minimum_is_refused(model, tmp_path):
    write_image(tmp_path / "a.png", 40, 48)
    with pytest.raises(
        ConfigError, match=r"slide window 16x16 .* at least 32 pixels; pass --crop 32"
    ):
        predict(model, tmp_path, tmp_path / "out", mode="slide", crop=16, stride=8)


def write_grey16(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)


def test_16_bit_images_predict_like_their_8_bit_version(model, tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (40, 48)).astype(np.uint16)
    (tmp_path / "16").mkdir()
    (tmp_path / "8").mkdir()
    write_grey16(tmp_path / "16" / "a.png", values)
    Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "8" / "a.png")
    deep = predict(model, tmp_path / "16", tmp_path / "out16")
    flat = predict(model, tmp_path / "8", tmp_path / "out8")
    assert np.array_equal(labels_of(deep[0]), labels_of(flat[0]))


def test_16_bit_image_of_12_bit_data_is_refused_by_name(model, tmp_path):
    write_grey16(tmp_path / "raw.png", np.full((40, 48), 4000))
    with pytest.raises(DataError, match=r"raw\.png: 16-bit image whose values all stay below"):
        predict(model, tmp_path, tmp_path / "out")


def test_a_file_that_is_no_image_stops_the_run_before_any_write(model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png", 40, 48)
    (images / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b\.png: cannot read"):
        predict(model, images, tmp_path / "out")
    assert not (tmp_path / "out" / "a.png").exists()
