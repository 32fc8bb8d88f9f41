"""``Segmenter.predict`` in Python and ``pivotseg predict`` on files (issue #17, item 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.config import config_from_dict, save_config
from pivotseg.errors import DataError
from pivotseg.segmenter import build_segmenter, load_segmenter
from tests.helpers import TINY_HEAD_ARGS
from tests.test_safety_predict import MODEL, labels_of, write_image


def make_run(folder: Path, **sections) -> Path:
    """A run folder (config.yaml + checkpoints/last) of a random tiny segmenter."""
    torch.manual_seed(0)
    build_segmenter(dict(MODEL)).save(folder / "checkpoints" / "last")
    cfg = config_from_dict({"model": dict(MODEL), **sections, "run_dir": str(folder)})
    save_config(cfg, folder / "config.yaml")
    return folder


def batch_sizes(model) -> list[tuple[int, int]]:
    """The (h, w) of every batch ``model`` is called on from now."""
    seen: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    return seen


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    # segmented at 36x43 (40x48 images), in 32-pixel windows every 16
    data, inference = {"eval_resize_short": 36}, {"mode": "slide", "crop": 32, "stride": 16}
    return make_run(tmp_path_factory.mktemp("run"), data=data, eval=inference)


@pytest.fixture(scope="module")
def model(run):
    return load_segmenter(run)


def test_labels_equal_the_png_of_pivotseg_predict_for_one_file(run, model, tmp_path, capsys):
    image = tmp_path / "street.jpg"
    write_image(image, 40, 48)
    out = tmp_path / "out"
    assert main(["predict", str(run), str(image), "--out", str(out)]) == 0
    assert "wrote 1 PNGs" in capsys.readouterr().out
    seen = batch_sizes(model)
    result = model.predict(image)
    assert result.labels.dtype == np.int64 and result.labels.shape == (40, 48)
    assert np.array_equal(result.labels, labels_of(out / "street.png"))
    # the run's inference: 36x43 after its eval resize, cut into its 32-pixel slide windows
    assert seen and set(seen) == {(32, 32)}
    seen.clear()
    model.predict(image, mode="whole", probabilities=False)
    assert seen == [(36, 43)]


def test_probabilities_are_the_softmax_of_the_logits_at_the_image_size(model, tmp_path):
    array = write_image(tmp_path / "a.png", 40, 48)
    result = model.predict(array, mode="whole", resize_short=0)
    with torch.no_grad():
        logits = model(torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float())
    expected = torch.softmax(logits[0].double(), dim=0).numpy()
    assert result.probabilities.dtype == np.float32
    assert result.probabilities.shape == (3, 40, 48)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert np.array_equal(result.labels, expected.argmax(0))


def test_mask2former_scores_become_probabilities_by_their_sum(tmp_path):
    torch.manual_seed(0)
    m2f = {**MODEL, "head": "mask2former", "head_args": dict(TINY_HEAD_ARGS["mask2former"])}
    model = build_segmenter(m2f).eval()
    array = write_image(tmp_path / "a.png", 40, 48)
    result = model.predict(array)  # no run: whole image, as it is
    with torch.no_grad():
        scores = model(torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float())[0].double()
    expected = (scores / scores.sum(0)).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    assert np.array_equal(result.labels, expected.argmax(0))


def test_skipping_probabilities_never_computes_them(model, tmp_path, monkeypatch):
    array = write_image(tmp_path / "a.png", 40, 48)
    full = model.predict(array)
    module = sys.modules["pivotseg.tasks.dgss.predict"]

    def refuse(*args):
        raise AssertionError("probabilities computed")

    monkeypatch.setattr(module, "class_probabilities", refuse)
    labels_only = model.predict(array, probabilities=False)
    assert labels_only.probabilities is None
    assert np.array_equal(labels_only.labels, full.labels)


def test_path_pil_image_and_array_give_identical_results(model, tmp_path):
    path = tmp_path / "a.png"
    array = write_image(path, 44, 52, seed=3)
    results = [
        model.predict(path),
        model.predict(str(path)),
        model.predict(Image.open(path)),
        model.predict(array),
    ]
    for other in results[1:]:
        assert np.array_equal(other.labels, results[0].labels)
        assert np.array_equal(other.probabilities, results[0].probabilities)


def test_grey_alpha_and_16_bit_images_as_pivotseg_predict_reads_them(run, model, tmp_path):
    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (40, 48)).astype(np.uint16)
    images = {
        "grey.png": Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)),
        "deep.png": Image.fromarray(deep),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    out = tmp_path / "out"
    files = [str(tmp_path / name) for name in images]
    assert main(["predict", str(run), *files, "--out", str(out)]) == 0
    for name, image in images.items():
        written = labels_of(out / name)
        assert np.array_equal(model.predict(tmp_path / name).labels, written)
        assert np.array_equal(model.predict(Image.open(tmp_path / name)).labels, written)
        assert np.array_equal(model.predict(image).labels, written)  # made in memory
    # 16-bit keeps the high byte: as the 8-bit grey image, converted to RGB
    high = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(model.predict(high).labels, labels_of(out / "deep.png"))


@pytest.mark.parametrize(
    "image, message",
    [
        ("missing.jpg", r"missing\.jpg: no such image file; check the path"),
        (np.zeros((40, 48), np.uint8), r"shape \(40, 48\) .*give uint8 RGB \(H, W, 3\)"),
        (np.zeros((40, 48, 4), np.uint8), r"shape \(40, 48, 4\) .*Image\.fromarray"),
        (np.zeros((40, 48, 3), np.float32), r"type float32: give uint8 RGB"),
        ([[0, 1]], r"image of type list: give a file path, a PIL image or a uint8"),
    ],
)
def test_bad_input_is_one_line(model, tmp_path, image, message):
    if isinstance(image, str):
        image = tmp_path / image
    with pytest.raises(DataError, match=message) as err:
        model.predict(image)
    assert "\n" not in str(err.value)


def test_a_run_folder_loads_with_its_config_and_a_built_model_with_defaults(run, tmp_path):
    by_run = load_segmenter(run)
    by_checkpoint = load_segmenter(run / "checkpoints" / "last")
    assert by_run.run_config.data.eval_resize_short == 36
    assert by_checkpoint.run_config.eval.mode == "slide"
    array = write_image(tmp_path / "a.png", 40, 48)
    assert np.array_equal(by_run.predict(array).labels, by_checkpoint.predict(array).labels)
    torch.manual_seed(0)
    built = build_segmenter(dict(MODEL))  # no run: whole image at its own size
    assert built.run_config is None
    seen = batch_sizes(built)
    built.predict(array, probabilities=False)
    assert seen == [(40, 48)]


def test_training_mode_is_restored_and_does_not_change_the_result(model, tmp_path):
    array = write_image(tmp_path / "a.png", 40, 48)
    expected = model.predict(array).labels
    model.train()
    try:
        assert np.array_equal(model.predict(array).labels, expected)
        assert model.training
    finally:
        model.eval()


# ----- pivotseg predict on files ----------------------------------------------------------------
def test_files_and_folders_together_keep_distinct_names(run, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_image(folder / "a.png", 40, 48, seed=1)
    write_image(folder / "b.png", 40, 48, seed=2)
    write_image(tmp_path / "a.jpg", 44, 40, seed=3)
    out = tmp_path / "out"
    args = ["predict", str(run), str(tmp_path / "a.jpg"), str(folder), "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]
    assert labels_of(out / "a.jpg.png").shape == (44, 40)
    alone = tmp_path / "alone"
    assert main(["predict", str(run), str(folder / "a.png"), "--out", str(alone)]) == 0
    assert np.array_equal(labels_of(alone / "a.png"), labels_of(out / "a.png.png"))


def test_the_same_file_twice_gives_one_png(run, tmp_path, capsys):
    write_image(tmp_path / "a.png", 40, 48)
    out = tmp_path / "out"
    files = [str(tmp_path / "a.png"), str(tmp_path / "." / "a.png"), str(tmp_path)]
    assert main(["predict", str(run), *files, "--out", str(out)]) == 0
    assert "wrote 1 PNGs" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["a.png"]


def test_two_files_of_one_name_are_refused_before_any_write(run, tmp_path, capsys):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        write_image(tmp_path / sub / "a.png", 40, 48)
    out = tmp_path / "out"
    args = ["predict", str(run), str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "two images named a.png" in err
    assert "separate --out folders" in err and not out.exists()


def test_a_missing_file_is_one_line(run, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert main(["predict", str(run), str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"pivotseg: error: {missing}: no such image file or folder; check the path"
    ]
