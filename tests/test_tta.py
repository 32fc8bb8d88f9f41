"""Test-time augmentation (``eval.tta_scales`` / ``tta_flip``, mmseg's multi-scale + flip test):
the average is checked against views computed by hand, and the settings reach eval, predict
and the results file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.config import EvalConfig, config_from_dict, save_config
from pivotseg.errors import ConfigError
from pivotseg.evaluation import slide_inference
from pivotseg.tasks.dgss import evaluate, infer_logits
from tests.test_dgss import make_folder_dataset
from tests.test_export_onnx import tiny_segmenter


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter("rein").eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 255


def _views_by_hand(fn, images, scales, flip):
    h, w = images.shape[-2:]
    views = []
    for s in scales:
        x = images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear")
        for flipped in (False, True) if flip else (False,):
            out = fn(x.flip(-1)).flip(-1) if flipped else fn(x)
            views.append(F.interpolate(out.softmax(1), size=(h, w), mode="bilinear"))
    return torch.stack(views).mean(0)


@torch.no_grad()
def test_no_augmentation_is_the_plain_forward(model, images):
    assert not EvalConfig().augmented
    assert torch.equal(infer_logits(model, images, EvalConfig()), model(images))


@torch.no_grad()
@pytest.mark.parametrize("scales, flip", [([1.0], True), ([0.8, 1.0, 1.5], True), ([2.0], False)])
def test_whole_image_views_average_their_softmax(model, images, scales, flip):
    cfg = EvalConfig(tta_scales=scales, tta_flip=flip)
    got = infer_logits(model, images, cfg).softmax(1)
    assert torch.allclose(got, _views_by_hand(model, images, scales, flip), atol=1e-6)


@torch.no_grad()
def test_sliding_windows_run_at_every_scale(model, images):
    cfg = EvalConfig(mode="slide", crop=32, stride=16, tta_scales=[0.8, 1.0], tta_flip=True)

    def slide(x):
        return slide_inference(model, x, 3, crop=(32, 32), stride=(16, 16), batch_size=4)

    got = infer_logits(model, images, cfg).softmax(1)
    assert torch.allclose(got, _views_by_hand(slide, images, [0.8, 1.0], True), atol=1e-6)


@torch.no_grad()
def test_a_view_below_the_models_minimum_side_is_taken_at_that_side(model):
    from pivotseg.tasks.dgss.predict import min_input_side

    side = min_input_side(model)
    small = torch.rand(1, 3, side, side + 8) * 255
    out = infer_logits(model, small, EvalConfig(tta_scales=[0.5, 1.0]))
    assert out.shape == (1, 3, side, side + 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("scales", [[], [0.0], [-1.0], [9.0]])
def test_tta_scales_are_checked(scales):
    with pytest.raises(ConfigError, match="eval.tta_scales"):
        EvalConfig(tta_scales=scales)


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    model.save(folder / "checkpoints" / "last")
    cfg = config_from_dict(
        {
            "model": model.config.to_dict(),
            "eval": {"tta_scales": [1, 2], "tta_flip": True},  # integers in YAML are scales
            "run_dir": str(folder),
        }
    )
    assert cfg.eval.tta_scales == [1.0, 2.0]
    save_config(cfg, folder / "config.yaml")
    return folder


def test_eval_uses_the_runs_tta_unless_overridden_and_records_it(run, tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "tgt", {"val": 2}, seed=1, shift=25)
    target = [f"tgt={data}:folder:val"]
    out = tmp_path / "scores.json"
    record = evaluate(run, target, verbose=False, output=out)
    inference = {"mode": "whole", "tta_scales": [1.0, 2.0], "tta_flip": True}
    assert record["inference"] == inference
    assert json.loads(out.read_text())["inference"] == inference
    plain = evaluate(run, target, verbose=False, tta_scales=[1], tta_flip=False)
    capsys.readouterr()
    evaluate(run, target, verbose=True)
    assert "test-time augmentation: scales 1, 2 with flip" in capsys.readouterr().out
    assert plain["inference"] == {"mode": "whole", "tta_scales": [1.0], "tta_flip": False}
    assert main(["eval", str(run), "--data", target[0], "--tta-scales", "1", "--no-tta-flip",
                 "--json", str(tmp_path / "cli.json")]) == 0  # fmt: skip
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["inference"]["tta_flip"] is False
    assert cli["mean_miou"] == pytest.approx(plain["mean_miou"], abs=1e-9)


def test_predict_takes_tta_and_refuses_it_with_adapt(run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(images / "a.png")
    assert main(["predict", str(run), str(images), "--out", str(tmp_path / "p"),
                 "--tta-scales", "0.75", "1.25"]) == 0  # fmt: skip
    assert (tmp_path / "p" / "a.png").is_file()
    capsys.readouterr()
    argv = ["predict", str(run), str(images), "--out", str(tmp_path / "q"), "--adapt"]
    assert main([*argv, "--tta-flip"]) == 2
    assert "drop --tta-scales / --tta-flip" in capsys.readouterr().err


@torch.no_grad()
def test_segmenter_predict_takes_the_overrides(model):
    image = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    got = model.predict(image, tta_scales=[1.0, 1.25], tta_flip=True).probabilities
    by_hand = _views_by_hand(model, pixels, [1.0, 1.25], True)[0].numpy()
    np.testing.assert_allclose(got, by_hand, atol=1e-5)
