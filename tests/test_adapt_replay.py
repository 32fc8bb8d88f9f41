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
from pivotseg.tasks.adapt.params import norm_affine_parameters
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
    norms = {n for n, _ in norm_affine_parameters(source)}  # TENT's set, on with replay
    opened = record_image_opens(monkeypatch)
    out = adapt_run(run, world["target"], tmp_path / "new", steps=3, progress=False, method="spl",
                    source_replay=True)  # fmt: skip
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
    assert changed & head and changed & declared  # the head joins the student with replay
    assert changed & params <= declared | head | norms
    # of the backbone only its normalisation layers' affine parameters move
    assert {n for n in changed if n.startswith("backbone.")} <= norms
    assert any(n.startswith("backbone.") for n in changed)
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["source_replay"] == str(world["src"])
    settings = summary["settings"]
    assert settings["adapt_head"] is True and settings["restore_prob"] == 0.0
    assert settings["adapt_norms"] is True and settings["entropy_weight"] == 1.0
    assert settings["teacher_momentum"] == 0.9 and settings["teacher_scales"] == [1.0]
    assert set(summary["adapted_parameters"]) == declared | head | norms
    records = read_metrics(out)
    assert [r["iter"] for r in records] == [1, 2, 3]
    expected = {"loss_source", "loss_target", "loss_entropy", "loss_pivot", "pseudo_quality"}
    assert expected <= records[0].keys()


def test_pseudo_label_weight_is_the_share_of_confident_pixels(world, tmp_path):
    run = world["runs"]["rein"]
    # tau = 1: no pixel is confident, so q = 0 and no pseudo-label counts anywhere
    none = adapt_run(run, world["target"], tmp_path / "a", steps=2, progress=False,
                     pseudo_threshold=1.0, class_mix=False, source_replay=True)  # fmt: skip
    records = read_metrics(none)
    assert all(r["pseudo_quality"] == 0.0 and r["loss_target"] == 0.0 for r in records)
    assert all(sum(r["coverage_per_class"]) == 0.0 for r in records)
    # tau = 0: every pixel is (a softmax maximum is above 0)
    every = adapt_run(run, world["target"], tmp_path / "b", steps=2, progress=False,
                      pseudo_threshold=0.0, class_mix=False, source_replay=True)  # fmt: skip
    assert all(r["pseudo_quality"] == 1.0 for r in read_metrics(every))


def test_source_free_offline_is_the_default_and_keeps_the_head(world, tmp_path, monkeypatch):
    run = world["runs"]["rein"]
    source = load(run)
    opened = record_image_opens(monkeypatch)
    out = adapt_run(run, world["target"], tmp_path / "n", steps=2, progress=False,
                    confidence_floor=0.0)  # fmt: skip
    monkeypatch.undo()
    src = world["src"].resolve()
    assert opened and not [p for p in opened if src in p.parents]  # no source image read
    changed = changed_names(tensors(source), tensors(load(out)))
    norms = {n for n, _ in norm_affine_parameters(source)}
    # the head is not in the student source-free: only its normalisation layers (TENT's set) move
    assert changed and {n for n in changed if n.startswith("head.")} <= norms
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["source_replay"] is None
    assert summary["settings"]["lr"] == 1e-4 and summary["settings"]["restore_prob"] == 0.01
    # the proxy's source-free recipe: the entropy term, the norms in the student, teacher 0.9;
    # of the backbone only normalisation parameters move
    assert {n for n in changed if n.startswith("backbone.")} <= norms
    assert summary["settings"]["entropy_weight"] == 1.0 and summary["settings"]["adapt_norms"]
    assert summary["settings"]["teacher_momentum"] == 0.9
    assert summary["settings"]["teacher_scales"] == [0.75, 1.0, 1.25]
    assert summary["settings"]["source_replay"] is False


def test_online_adaptation_never_replays_the_source(world):
    model = load(world["runs"]["dpft"])
    frames = [np.array(Image.open(p)) for p in sorted(world["target"].iterdir())]
    norms = {n for n, _ in norm_affine_parameters(model)}
    head = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    stats = [f.stats for f in adapt_stream(model, enumerate(frames), lr=1e-2, confidence_floor=0)]
    assert "loss_source" not in stats[0]
    moved = {n for n, p in model.head.named_parameters() if not torch.equal(p, head[n])}
    assert {f"head.{n}" for n in moved} <= norms  # only the head's norms (TENT's set) adapt


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
        adapt_run(run, world["target"], tmp_path / "out", steps=1, progress=False,
                  source_replay=True)  # fmt: skip
    message = str(err.value)
    assert str(missing) in message and "--no-source-replay" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.adapting-*"))
    code = main(["adapt", str(run), "--images", str(world["target"]), "--out",
                 str(tmp_path / "o2"), "--steps", "1", "--source-replay"])  # fmt: skip
    err_text = capsys.readouterr().err.strip()
    assert code == 2 and err_text.startswith("pivotseg: error:") and "\n" not in err_text
    # source-free by default: the unreachable source is never looked for
    code = main(["adapt", str(run), "--images", str(world["target"]), "--out",
                 str(tmp_path / "o3"), "--steps", "1"])  # fmt: skip
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
    assert s.resolved(False).source_replay is False and s.source_replay is False
    assert s.resolved(False).teacher_scales == (0.75, 1.0, 1.25)
    assert s.resolved(True).teacher_scales == (1.0,)


def test_class_balanced_selection_labels_the_share_its_class_thresholds_pass(world, tmp_path):
    run = world["runs"]["rein"]
    # fraction 1 and floor 0: every pixel passes its class's threshold (the minimum)
    every = adapt_run(run, world["target"], tmp_path / "a", steps=2, progress=False,
                      target_selection="class_balanced", class_fraction=1.0,
                      confidence_floor=0.0, class_mix=False, source_replay=True)  # fmt: skip
    assert all(r["pseudo_quality"] == 1.0 for r in read_metrics(every))
    # floor 1: no pixel is above it, so the target term has nothing to learn from
    none = adapt_run(run, world["target"], tmp_path / "b", steps=2, progress=False,
                     target_selection="class_balanced", confidence_floor=1.0,
                     class_mix=False, source_replay=True)  # fmt: skip
    records = read_metrics(none)
    assert all(r["pseudo_quality"] == 0.0 and r["loss_target"] == 0.0 for r in records)
    # half per class: about half the pixels (ties and the EMA of thresholds aside)
    half = adapt_run(run, world["target"], tmp_path / "c", steps=1, progress=False,
                     target_selection="class_balanced", class_fraction=0.5,
                     confidence_floor=0.0, class_mix=False, source_replay=True)  # fmt: skip
    assert 0.3 < read_metrics(half)[0]["pseudo_quality"] <= 0.7


def test_entropy_term_is_the_mean_entropy_of_the_student_on_the_target(world):
    from pivotseg.tasks.adapt.selftrain import mean_entropy

    logits = torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): p = 1/2 and ~1
    where = torch.tensor([[[True, False]]])
    assert math.isclose(float(mean_entropy(logits, where)), math.log(2), rel_tol=1e-6)
    assert float(mean_entropy(logits, torch.zeros_like(where))) == 0.0
    model = load(world["runs"]["rein"])
    frames = [np.array(Image.open(p)) for p in sorted(world["target"].iterdir())]
    weighted = [f.stats for f in adapt_stream(model, enumerate(frames[:2]), entropy_weight=0.5)]
    assert all(s["loss_entropy"] > 0 for s in weighted)
    off = adapt_stream(load(world["runs"]["rein"]), enumerate(frames[:2]), entropy_weight=0.0)
    assert "loss_entropy" not in next(off).stats


def test_adapt_norms_adds_the_backbone_norms_and_the_run_saves_them(world, tmp_path):
    run = world["runs"]["rein"]
    source = load(run)
    norms = {n for n, _ in norm_affine_parameters(source) if n.startswith("backbone.")}
    assert norms
    out = adapt_run(run, world["target"], tmp_path / "n", steps=2, progress=False,
                    adapt_norms=True, entropy_weight=1.0, lr=1e-2)  # fmt: skip
    summary = json.loads((out / "adapt.json").read_text())
    assert norms <= set(summary["adapted_parameters"])
    adapted = load(out)  # the backbone is rebuilt from its source: the norms come from the run
    changed = changed_names(tensors(source), tensors(adapted))
    assert changed & norms
    assert {"loss_entropy"} <= read_metrics(out)[0].keys()
    kept = adapt_run(run, world["target"], tmp_path / "k", steps=2, progress=False,
                     adapt_norms=False, entropy_weight=0.0, lr=1e-2)  # fmt: skip
    assert not changed_names(tensors(source), tensors(load(kept))) & norms
    assert "loss_entropy" not in read_metrics(kept)[0]


def test_new_settings_are_checked():
    with pytest.raises(Exception, match="target_selection"):
        AdaptSettings(target_selection="top")
    with pytest.raises(Exception, match="entropy_weight"):
        AdaptSettings(entropy_weight=-1.0)
    with pytest.raises(Exception, match="target_weight"):
        AdaptSettings(target_weight=-0.5)
    with pytest.raises(Exception, match="source-free"):
        AdaptSettings(target_weight=0.0).resolved(False)


def test_target_weight_zero_is_source_training_alone(world, tmp_path):
    """The replay-only control: with no target term the target images change nothing."""
    run = world["runs"]["rein"]
    other = tmp_path / "other"
    other.mkdir()
    for path in sorted(world["target"].iterdir()):  # the same sizes, other content
        Image.fromarray(255 - np.array(Image.open(path).convert("RGB"))).save(other / path.name)
    control = dict(steps=3, progress=False, target_weight=0.0, class_mix=False, method="selftrain",
                   source_replay=True)  # fmt: skip
    a = adapt_run(run, world["target"], tmp_path / "a", **control)
    b = adapt_run(run, other, tmp_path / "b", **control)
    assert all(r["loss_target"] == 0.0 and "loss_entropy" not in r for r in read_metrics(a))
    first, second = tensors(load(a)), tensors(load(b))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert changed_names(tensors(load(run)), first)  # the source loss still trained it
    # with the target term on, the target images do matter
    c = adapt_run(run, other, tmp_path / "c", **{**control, "target_weight": 1.0})
    assert changed_names(first, tensors(load(c)))


def test_cli_runs_the_replay_only_control_and_refuses_it_source_free(world, tmp_path, capsys):
    run = str(world["runs"]["rein"])
    out = tmp_path / "control"
    args = ["adapt", run, "--images", str(world["target"]), "--out", str(out), "--steps", "1"]
    assert main([*args, "--method", "selftrain", "--source-replay", "--target-weight", "0",
                 "--no-class-mix"]) == 0  # fmt: skip
    settings = json.loads((out / "adapt.json").read_text())["settings"]
    assert settings["target_weight"] == 0.0 and settings["class_mix"] is False
    code = main(["adapt", run, "--images", str(world["target"]), "--out", str(tmp_path / "sf"),
                 "--no-source-replay", "--target-weight", "0"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "target_weight" in err and "source-free" in err
    assert not (tmp_path / "sf").exists()


def test_cli_takes_teacher_scales_and_refuses_them_without_1(world, tmp_path, capsys):
    run = str(world["runs"]["rein"])
    base = ["adapt", run, "--images", str(world["target"]), "--steps", "1"]
    out = tmp_path / "ms"
    assert main([*base, "--out", str(out), "--teacher-scales", "1", "2"]) == 0
    assert json.loads((out / "adapt.json").read_text())["settings"]["teacher_scales"] == [1.0, 2.0]
    code = main([*base, "--out", str(tmp_path / "bad"), "--teacher-scales", "0.5", "2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "teacher_scales=[0.5, 2.0]" in err and "1 among them" in err
    assert not (tmp_path / "bad").exists()
