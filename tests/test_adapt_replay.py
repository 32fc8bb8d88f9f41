# ruff: noqa: F811
"""Offline self-training with source replay (DAFormer-style) and its pieces, on tiny segmenters.

The runs, the source folder dataset and the unlabelled target folder come from
``tests/test_adapt.py``'s ``world`` fixture.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from pivotseg.cli.main import main
from pivotseg.engine import read_metrics
from pivotseg.errors import DataError
from pivotseg.tasks.adapt import AdaptSettings, adapt_run, adapt_stream
from pivotseg.tasks.adapt.replay import SourceReplay, class_mix, gaussian_blur
from pivotseg.tasks.adapt.uda import weighted_cross_entropy
from tests.helpers import record_image_opens

# the fixture is used by name (pytest), hence F401/F811
from tests.test_adapt import changed_names, digest, load, tensors, world  # noqa: F401, F811


def test_replay_trains_declared_parameters_and_head_and_reads_no_target_label(
    world, tmp_path, monkeypatch
):
    run = world["runs"]["dpft"]
    before_bytes = digest(run)
    source = load(run)
    declared = {n for n, _ in source.tuning.adaptable_parameters()}
    head = {f"head.{n}" for n, _ in source.head.named_parameters()}
    opened = record_image_opens(monkeypatch)
    out = adapt_run(run, world["target"], tmp_path / "new", steps=3, progress=False)
    monkeypatch.undo()

    targets = {p.resolve() for p in world["target"].iterdir()}
    src = world["src"].resolve()
    # target images, and the source's own images and labels: nothing else
    assert set(opened) & targets and all(p in targets or src in p.parents for p in opened)
    assert any("labels" in p.parts for p in opened if src in p.parents)  # source labels used
    assert digest(run) == before_bytes
    adapted = load(out)
    changed = changed_names(tensors(source), tensors(adapted))
    params = {n for n, _ in adapted.named_parameters()}
    assert changed & head and changed & declared  # the head joins the student by default
    assert changed & params <= declared | head
    assert not any(n.startswith("backbone.") for n in changed)
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["source_replay"] == str(world["src"])
    settings = summary["settings"]
    assert settings["adapt_head"] is True and settings["restore_prob"] == 0.0
    assert set(summary["adapted_parameters"]) == declared | head
    records = read_metrics(out)
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert {"loss_source", "loss_target", "loss_pivot", "pseudo_quality"} <= records[0].keys()


def test_pseudo_label_weight_is_the_share_of_confident_pixels(world, tmp_path):
    run = world["runs"]["rein"]
    # tau = 1: no pixel is confident, so q = 0 and no pseudo-label counts anywhere
    none = adapt_run(run, world["target"], tmp_path / "a", steps=2, progress=False,
                     pseudo_threshold=1.0, class_mix=False)  # fmt: skip
    records = read_metrics(none)
    assert all(r["pseudo_quality"] == 0.0 and r["loss_target"] == 0.0 for r in records)
    assert all(sum(r["coverage_per_class"]) == 0.0 for r in records)
    # tau = 0: every pixel is (a softmax maximum is above 0)
    every = adapt_run(run, world["target"], tmp_path / "b", steps=2, progress=False,
                      pseudo_threshold=0.0, class_mix=False)  # fmt: skip
    assert all(r["pseudo_quality"] == 1.0 for r in read_metrics(every))


def test_source_free_offline_keeps_the_head_and_the_source_free_defaults(world, tmp_path):
    run = world["runs"]["rein"]
    source = load(run)
    out = adapt_run(run, world["target"], tmp_path / "n", steps=2, progress=False,
                    source_replay=False, confidence_floor=0.0)  # fmt: skip
    changed = changed_names(tensors(source), tensors(load(out)))
    assert changed and not any(n.startswith("head.") for n in changed)
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["source_replay"] is None
    assert summary["settings"]["lr"] == 1e-4 and summary["settings"]["restore_prob"] == 0.01


def test_online_adaptation_never_replays_the_source(world):
    model = load(world["runs"]["dpft"])
    frames = [np.array(Image.open(p)) for p in sorted(world["target"].iterdir())]
    head = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    stats = [f.stats for f in adapt_stream(model, enumerate(frames), lr=1e-2, confidence_floor=0)]
    assert "loss_source" not in stats[0]
    assert all(torch.equal(p, head[n]) for n, p in model.head.named_parameters())


def _moved_source(world, tmp_path, missing: Path) -> Path:
    """A copy of the rein run whose config.yaml points its source data at ``missing``."""
    run = tmp_path / "run"
    shutil.copytree(world["runs"]["rein"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["source"]["path"] = str(missing)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_unreachable_source_is_one_line_naming_the_path_and_the_switch(world, tmp_path, capsys):
    missing = tmp_path / "gone"
    run = _moved_source(world, tmp_path, missing)
    with pytest.raises(DataError) as err:
        adapt_run(run, world["target"], tmp_path / "out", steps=1, progress=False)
    message = str(err.value)
    assert str(missing) in message and "--no-source-replay" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.adapting-*"))
    code = main(["adapt", str(run), "--images", str(world["target"]), "--out",
                 str(tmp_path / "o2"), "--steps", "1"])  # fmt: skip
    err_text = capsys.readouterr().err.strip()
    assert code == 2 and err_text.startswith("pivotseg: error:") and "\n" not in err_text
    code = main(["adapt", str(run), "--images", str(world["target"]), "--out",
                 str(tmp_path / "o3"), "--steps", "1", "--no-source-replay"])  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "o3" / "adapt.json").read_text())["source_replay"] is None


# ----- the pieces, against hand-computed values -------------------------------------------
def test_class_mix_pastes_half_of_the_present_classes_whole():
    label = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 255], [3, 3, 2, 2, 1, 1, 0, 255]])[None]
    image = torch.zeros(1, 3, 2, 8)
    for seed in range(10):
        mask = class_mix(image, label, image, torch.Generator().manual_seed(seed))[0]
        pasted = set(label[0][mask].tolist())
        assert len(pasted) == math.ceil(4 / 2) and 255 not in pasted
        for c in range(4):  # a class is pasted with all of its pixels or none
            assert mask[label[0] == c].all() or not mask[label[0] == c].any()
    only_ignored = torch.full((1, 2, 8), 255)
    assert not class_mix(image, only_ignored, image, torch.Generator()).any()


def test_weighted_cross_entropy_matches_torch_and_scales_with_the_pixel_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, 0] = 255
    cw = torch.tensor([0.5, 1.0, 2.0, 3.0])
    expected = F.cross_entropy(logits, labels, weight=cw, ignore_index=255)
    assert torch.allclose(weighted_cross_entropy(logits, labels, None, cw), expected)
    q = torch.full(labels.shape, 0.25)
    assert torch.allclose(weighted_cross_entropy(logits, labels, q, cw), 0.25 * expected)
    plain = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(weighted_cross_entropy(logits, labels), plain)
    assert weighted_cross_entropy(logits, torch.full_like(labels, 255)) == 0.0


def test_gaussian_blur_keeps_flat_images_and_spreads_a_point():
    flat = torch.full((3, 9, 9), 100.0)
    assert torch.allclose(gaussian_blur(flat, 1.0, 5), flat)
    point = torch.zeros(3, 9, 9)
    point[:, 4, 4] = 1.0
    blurred = gaussian_blur(point, 1.0, 5)
    assert torch.isclose(blurred.sum(), torch.tensor(3.0)) and blurred[0, 4, 4] < 0.2
    x = torch.arange(5.0) - 2
    g = torch.exp(-(x**2) / 2)
    assert torch.isclose(blurred[0, 4, 4], (g[2] / g.sum()) ** 2)


def test_target_crops_have_the_source_crop_size(world, tmp_path):
    from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder

    cfg = find_run_config(resolve_model_folder(world["runs"]["rein"]))
    replay = SourceReplay(cfg, seed=0, work_dir=tmp_path)
    rng = np.random.default_rng(0)
    for shape in [(40, 48, 3), (20, 300, 3), (300, 10, 3)]:
        crop = replay.target_crop(np.zeros(shape, np.uint8), rng)
        assert crop.shape == (32, 32, 3)
    images, labels = replay.batch(2)
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2, 32, 32)
    again = SourceReplay(cfg, seed=0, work_dir=tmp_path).batch(2)
    assert torch.equal(again[0], images)  # the draw order is the seed's


def test_settings_resolve_by_mode():
    s = AdaptSettings()
    assert s.resolved(True).adapt_head is True and s.resolved(False).adapt_head is False
    assert AdaptSettings(lr=3e-3).resolved(True).lr == 3e-3  # a given value wins
    assert s.resolved(False).source_replay is False
