"""``pivotseg train / eval / predict`` through the CLI entry point (in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.config import load_config
from pivotseg.engine import TrainingStopped, read_metrics
from pivotseg.tasks.dgss import evaluate
from pivotseg.tasks.dgss.predict import palette_for
from tests.test_dgss import CLASSES, config_dict, make_folder_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data folder, a config file and a 4-iteration run made by ``pivotseg train``."""
    root = tmp_path_factory.mktemp("cli")
    make_folder_dataset(root / "src", {"train": 4, "val": 2})
    make_folder_dataset(root / "tgt", {"val": 3}, seed=1, shift=25)
    data = config_dict(root, root / "unused")
    del data["run_dir"]
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    run = root / "run"
    code = main(["train", str(config), "train.iterations=4", f"run_dir={run}"])
    assert code == 0
    return root, config, run


def test_train_writes_a_run_folder(trained, capsys):
    root, config, run = trained
    assert load_config(run / "config.yaml").train.iterations == 4
    assert (run / "checkpoints" / "last" / "segmenter.json").is_file()
    assert [r["iter"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_stop_then_resume_without_config(trained, capsys):
    root, config, _ = trained
    run = root / "resumable"
    assert main(["train", str(config), f"run_dir={run}", "--stop-at", "2"]) == 0
    assert [r["iter"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    assert main(["train", "--resume", str(run)]) == 0  # config.yaml of the run is used
    assert [r["iter"] for r in read_metrics(run) if "loss" in r] == list(range(1, 9))


def test_unknown_key_is_one_line_without_traceback(trained, capsys):
    _, config, _ = trained
    assert main(["train", str(config), "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pivotseg: error: unknown config key train.lrr; did you mean train.lr?"
    assert main(["train"]) == 2
    assert "give a CONFIG file" in capsys.readouterr().err


def test_stop_signal_exits_130_with_the_resume_command(trained, capsys, monkeypatch):
    import pivotseg.tasks.dgss as dgss

    _, config, _ = trained

    def stopped(cfg, resume=None, stop_at=None, **options):
        raise TrainingStopped("stopped at iteration 2 of 4; saved X; resume with: pivotseg ...")

    monkeypatch.setattr(dgss, "train", stopped)
    assert main(["train", str(config)]) == 130
    assert "resume with: pivotseg" in capsys.readouterr().err


def test_eval_prints_table_and_writes_json(trained, capsys):
    root, _, run = trained
    out = root / "eval.json"
    code = main(
        [
            "eval",
            str(run),
            "--data",
            f"tgt={root / 'tgt'}:folder:val",
            "--data",
            f"again={root / 'tgt'}:folder:val",
            "--mode",
            "whole",
            "--json",
            str(out),
            "--workers",
            "0",
        ]  # fmt: skip
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "tgt" in table and "again" in table and "mean (targets)" in table
    record = json.loads(out.read_text())
    tgt, again = record["datasets"]
    assert (tgt["name"], again["name"]) == ("tgt", "again")
    assert {**tgt, "name": "again"} == again
    assert record["mean_miou"] == pytest.approx(tgt["miou"])


def test_eval_bad_data_argument(trained, capsys):
    _, _, run = trained
    assert main(["eval", str(run), "--data", "x=/nowhere:folder:val"]) == 2
    assert "/nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["label", "color", "overlay"])
def test_predict_formats(trained, tmp_path, fmt):
    root, _, run = trained
    images = root / "tgt" / "images" / "val"
    assert main(["predict", str(run), str(images), "--out", str(tmp_path), "--format", fmt]) == 0
    # the label PNGs are the reference the two other formats must agree with
    labels = tmp_path / "labels"
    if fmt != "label":
        assert main(["predict", str(run), str(images), "--out", str(labels)]) == 0
    else:
        labels = tmp_path
    palette = palette_for(CLASSES, 3)
    if fmt == "label":
        # pixel accuracy of the written PNGs = the evaluation's, with the same inference
        correct = total = 0
        for src in sorted(images.iterdir()):
            pred = np.asarray(Image.open(tmp_path / f"{src.stem}.png")).astype(np.int64)
            truth = np.asarray(Image.open(root / "tgt" / "labels" / "val" / src.name))
            valid = truth != 255
            correct += int((pred[valid] == truth[valid]).sum())
            total += int(valid.sum())
        record = evaluate(run, verbose=False)
        assert 100 * correct / total == pytest.approx(record["targets"]["tgt"]["acc"], abs=1e-9)
    for src in sorted(images.iterdir()):
        out = Image.open(tmp_path / f"{src.stem}.png")
        pred = np.asarray(Image.open(labels / f"{src.stem}.png"))
        image = np.asarray(Image.open(src).convert("RGB"))
        if fmt == "overlay":  # a legend strip beside the image (tests/test_overlay_legend.py)
            out = out.crop((0, 0, *Image.open(src).size))
        assert out.size == Image.open(src).size
        assert pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1, 2}
        if fmt == "color":
            assert out.mode == "RGB" and np.array_equal(np.asarray(out), palette[pred])
        elif fmt == "overlay":
            expected = (0.5 * image + 0.5 * palette[pred]).round().astype(np.uint8)
            assert np.array_equal(np.asarray(out), expected)
