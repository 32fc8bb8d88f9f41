"""Test-time adaptation (``pivotseg adapt``, ``adapt_stream``) on tiny DINOv2 segmenters.

Source runs are trained here for a few iterations on a folder dataset written here; the target
is a folder of images only (shifted colours), with no label file anywhere near it. The backbone
is a saved folder (``backbone_source``), so checkpoints hold only what training changed, as
with real pretrained backbones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pivotseg.backbones import build_backbone
from pivotseg.cli.main import main
from pivotseg.config import config_from_dict
from pivotseg.engine import read_metrics
from pivotseg.engine.checkpoint import resolve_model_folder
from pivotseg.errors import ConfigError, DataError
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.adapt import AdaptSettings, adapt_run, adapt_stream, build_adapter
from pivotseg.tasks.adapt.params import norm_affine_parameters
from pivotseg.tasks.adapt.selftrain import (
    ClassThresholds,
    DriftGuard,
    SelfTrainer,
    move_pivots,
)
from pivotseg.tasks.dgss import evaluate, train
from pivotseg.tuning.pivots import PivotBank
from tests.helpers import TINY_HEAD_ARGS, TINY_METHOD_ARGS, record_image_opens, tiny_vit_config

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
# Warm every class up front and keep small thresholds: a tiny random model is not confident.
LOOSE = dict(confidence_floor=0.0, class_fraction=0.8)


def write_images(folder: Path, count: int, seed: int, shift: int, labels: Path | None = None):
    """Three vertical colour bands (classes 0/1/2); labels only when a label folder is given."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        labels.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = 40, 48
        label = np.zeros((h, w), np.uint8)
        a, b = sorted(rng.choice(np.arange(8, w - 8), 2, replace=False))
        label[:, a:b], label[:, b:] = 1, 2
        image = (COLOURS[label] + shift + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png")
        if labels is not None:
            Image.fromarray(label).save(labels / f"{i:03d}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    src = root / "src"
    write_images(src / "images" / "train", 4, 0, 0, labels=src / "labels" / "train")
    (src / "classes.json").write_text(json.dumps({"classes": ["red", "green", "blue"]}))
    write_images(root / "target", 4, 1, 40)
    torch.manual_seed(0)
    build_backbone("dinov2", None, config=tiny_vit_config()).save_pretrained(root / "backbone")
    runs = {}
    for method in ("dpft", "rein", "frozen"):
        cfg = config_from_dict(
            {
                "model": {
                    "num_classes": 3,
                    "backbone": "dinov2",
                    "backbone_source": str(root / "backbone"),
                    "method": method,
                    "method_args": dict(TINY_METHOD_ARGS[method]),
                    "head": "fpn",
                    "head_args": dict(TINY_HEAD_ARGS["fpn"]),
                },
                "data": {
                    "source": {"path": str(src), "format": "folder", "split": "train"},
                    "crop_size": 32,
                    "scales": [40],
                    "num_workers": 0,
                },
                "train": {
                    "iterations": 4,
                    "global_batch_size": 2,
                    "lr": 1e-3,
                    "eval_every": 0,
                    "checkpoint_every": 0,
                    "log_every": 1,
                },
                "eval": {"mode": "whole"},
                "run_dir": str(root / f"run_{method}"),
            }
        )
        runs[method] = train(cfg)
    return {"root": root, "target": root / "target", "src": src, "runs": runs}


def load(run: Path):
    return load_segmenter(resolve_model_folder(run))


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tensors(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def changed_names(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {n for n in a if not torch.equal(a[n], b[n])}


# ----- offline adaptation: what changes, what does not ------------------------------------------
@pytest.mark.parametrize(
    "method, adaptation, expected_prefixes",
    [
        ("dpft", "spl", ("tuning.tokens_", "tuning.context.", "tuning.gamma")),
        ("dpft", "selftrain", ("tuning.tokens_", "tuning.context.", "tuning.gamma")),
        ("rein", "selftrain", ("tuning.tokens_", "tuning.scale")),
    ],
)
def test_self_training_changes_only_declared_parameters(
    world, tmp_path, monkeypatch, method, adaptation, expected_prefixes
):
    run = world["runs"][method]
    before_bytes = digest(run)
    source = load(run)
    declared = {n for n, _ in source.tuning.adaptable_parameters()}
    assert declared and all(n.startswith(expected_prefixes) for n in declared)
    opened = record_image_opens(monkeypatch)
    out = adapt_run(
        run, world["target"], tmp_path / "new", method=adaptation, steps=3, progress=False,
        source_replay=False, adapt_norms=False, **LOOSE,
    )  # fmt: skip
    monkeypatch.undo()

    targets = {p.resolve() for p in world["target"].iterdir()}
    assert opened and set(opened) <= targets  # only target images, never a label file
    assert digest(run) == before_bytes  # the source run is untouched
    adapted = load(out)  # the run folder opens like a trained one
    changed = changed_names(tensors(source), tensors(adapted))
    params = {n for n, _ in adapted.named_parameters()}
    assert changed & params and changed & params <= declared
    assert not any(n.startswith("backbone.") for n in changed)  # bit-identical backbone
    pivots = {n for n in changed if n.startswith("tuning.pivot_banks.")}
    assert bool(pivots) == (adaptation == "spl")
    assert not changed - params - pivots
    summary = json.loads((out / "adapt.json").read_text())
    assert summary["method"] == adaptation and summary["settings"]["steps"] == 3
    assert set(summary["adapted_parameters"]) == declared
    records = read_metrics(out)
    assert [r["iter"] for r in records] == [1, 2, 3]
    assert len(records[0]["coverage_per_class"]) == 3 and "teacher_conf" in records[0]
    assert (out / "config.yaml").is_file() and (out / "env.json").is_file()


def test_tent_updates_only_norm_affine_parameters(world, tmp_path):
    run = world["runs"]["frozen"]
    source = load(run)
    norms = {n for n, _ in norm_affine_parameters(source)}
    assert any(n.startswith("backbone.") for n in norms) and any(
        n.startswith("head.") for n in norms
    )
    out = adapt_run(run, world["target"], tmp_path / "tent", method="tent", steps=3, progress=False)
    # the backbone is rebuilt from its source folder: the adapted norms travel in the checkpoint
    adapted = load(out)
    changed = changed_names(tensors(source), tensors(adapted))
    assert changed and changed <= norms
    assert any(n.startswith("backbone.") for n in changed)


def test_tent_lowers_the_entropy_it_minimises(world):
    model = load(world["runs"]["frozen"])
    image = np.array(Image.open(world["target"] / "000.png"))

    def entropy():
        with torch.no_grad():
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            p = torch.softmax(model(x), 1)
            return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())

    first = entropy()
    for _ in adapt_stream(model, [(i, image) for i in range(10)], method="tent", lr=1e-2):
        pass
    assert entropy() < first


def test_adapted_run_evaluates_and_predicts_like_any_run(world, tmp_path):
    out = adapt_run(
        world["runs"]["dpft"], world["target"], tmp_path / "new", steps=2, progress=False
    )
    # auto on DPFT, even with set pivots: selftrain (spl's pivot parts measured no effect)
    assert json.loads((out / "adapt.json").read_text())["method"] == "selftrain"
    record = evaluate(out, [f"src={world['src']}:folder:train"], verbose=False)
    assert 0.0 <= record["mean_miou"] <= 100.0
    assert main(["predict", str(out), str(world["target"]), "--out", str(tmp_path / "p")]) == 0
    assert len(list((tmp_path / "p").glob("*.png"))) == 4


# ----- the pieces, checked by hand ----------------------------------------------------------
class _FakeBackbone:
    def block_strides(self):
        return [2]


class _FakeDPFT:
    """What move_pivots reads of DPFT: one pivot bank of width 2, stride-2 tokens, 2 classes."""

    def __init__(self):
        self.backbone = _FakeBackbone()
        self.num_classes = 2
        bank = PivotBank(2, 2)
        bank.pivots[0] = torch.tensor([1.0, 0.0])
        bank.valid[0] = True  # class 1 was never seen on the source
        self.pivot_banks = {"2": bank}


def test_pivots_move_toward_target_features_by_the_ema_formula():
    tuning = _FakeDPFT()
    # a 4x4 image = 2x2 tokens of 2x2 pixels; 255 = no pseudo-label
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 255], [1, 1, 255, 255], [1, 255, 255, 1]])[None]
    # token 0: four 0s; token 1: three 0s; token 2: three 1s; token 3: one 1 (< half: none)
    feats = torch.tensor([[2.0, 4.0], [4.0, 0.0], [3.0, 3.0], [9.0, 9.0]])[None]
    moved = move_pivots(tuning, {2: (feats, (2, 2), 0)}, labels, momentum=0.9, min_tokens=1)
    bank = tuning.pivot_banks["2"]
    assert moved == [0, 1]
    # class 0: mean of tokens 0 and 1 = (3, 2); 0.9 * (1, 0) + 0.1 * (3, 2) = (1.2, 0.2)
    assert torch.allclose(bank.pivots[0], torch.tensor([1.2, 0.2]))
    # class 1 had no source pivot: it takes the target mean
    assert torch.allclose(bank.pivots[1], torch.tensor([3.0, 3.0])) and bank.valid[1]

    # with at least 2 tokens required, class 1 (one token) stays put
    tuning = _FakeDPFT()
    assert move_pivots(tuning, {2: (feats, (2, 2), 0)}, labels, 0.9, min_tokens=2) == [0]
    assert not tuning.pivot_banks["2"].valid[1]


def test_class_thresholds_keep_the_top_fraction_of_each_class():
    t = ClassThresholds(3, fraction=0.5, floor=0.3, momentum=0.5)
    conf = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.35, 0.33, 0.31, 0.2]])
    pred = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2]])
    valid = torch.ones_like(pred, dtype=torch.bool)
    selected = t.select(conf, pred, valid)
    # class 0: median 0.75 -> 0.9, 0.8; class 1: median 0.33 -> 0.35, 0.33 (both above the
    # floor); class 2: its one pixel is its median but below the floor
    assert selected.tolist() == [[True, True, False, False, True, True, False, False]]
    assert torch.allclose(t.values, torch.tensor([0.75, 0.33, 0.2]))
    # the next batch moves class 0's threshold halfway to its median (0.55): (0.75 + 0.55) / 2
    t.select(torch.tensor([[0.6, 0.5]]), torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.bool))
    assert torch.isclose(t.values[0], torch.tensor(0.65))
    # small classes are not swamped: class 1 keeps half its pixels although class 0's are surer
    assert selected[pred == 1].sum() == 2


def test_drift_guard_fires_on_collapse_and_starts_over():
    g = DriftGuard(collapse_ratio=0.9, min_agreement=0.5, smoothing=0.5)
    assert not g.update(0.8, 0.8, 1.0)
    # smoothed teacher conf (0.8 + 0.6) / 2 = 0.7 < 0.9 * 0.8 = 0.72
    assert g.update(0.6, 0.8, 1.0)
    assert not g.update(0.6, 0.65, 1.0)  # a fresh start: 0.6 >= 0.585
    assert DriftGuard(0.0, 0.5, 0.5).update(0.9, 0.9, 0.4)  # agreement below 0.5


def _batch(world):
    image = np.array(Image.open(world["target"] / "000.png"))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return pixels, torch.ones(1, *image.shape[:2], dtype=torch.bool)


def test_restore_probability_one_returns_the_source_weights(world):
    model = load(world["runs"]["dpft"])
    before = tensors(model)
    trainer = SelfTrainer(model, AdaptSettings(restore_prob=1.0, lr=1e-2, **LOOSE), pivots=False)
    trainer.step(*_batch(world))
    assert trainer.optimizer.state  # the student did take a step ...
    assert not changed_names(before, tensors(model))  # ... and was restored, element by element
    trainer.finish()
    assert not changed_names(before, tensors(model))  # the teacher too


def test_the_teacher_is_deployed_and_only_move_pivots_moves_the_pivots(world):
    model = load(world["runs"]["dpft"])
    before = tensors(model)
    # a teacher that never moves, pivots that never move, no restore: a student that does
    settings = AdaptSettings(
        teacher_momentum=1.0, pivot_momentum=1.0, restore_prob=0.0, lr=1e-2, **LOOSE
    )
    trainer = SelfTrainer(model, settings, pivots=True)
    records = [trainer.step(*_batch(world))[1] for _ in range(2)]
    assert any(r["pivots_moved"] for r in records) and records[-1]["loss_pivot"] > 0
    student = changed_names(before, tensors(model))
    assert student and not any(n.startswith("tuning.pivot_banks.") for n in student)
    trainer.finish()
    assert not changed_names(before, tensors(model))


def test_reset_on_confidence_collapse_returns_to_the_source(world):
    model = load(world["runs"]["dpft"])
    before = tensors(model)
    settings = AdaptSettings(collapse_ratio=0.0, min_agreement=0.0, lr=1e-2, **LOOSE)
    trainer = SelfTrainer(model, settings, pivots=True)
    for _ in range(2):
        assert not trainer.step(*_batch(world))[1]["reset"]
    assert changed_names(before, tensors(model))  # student and pivots have moved
    trainer.guard.update = lambda *stats: True  # the criterion itself: the DriftGuard test
    _, record = trainer.step(*_batch(world))
    assert record["reset"] and record["resets"] == trainer.resets == 1
    assert torch.isnan(trainer.thresholds.values).all() and not trainer.optimizer.state
    assert not changed_names(before, tensors(model))  # student and pivots are the source's
    trainer.finish()
    assert not changed_names(before, tensors(model))  # and so is the teacher


def test_no_reset_while_the_teacher_stays_confident(world):
    model = load(world["runs"]["dpft"])
    trainer = SelfTrainer(model, AdaptSettings(collapse_ratio=0.5, **LOOSE), pivots=True)
    records = [trainer.step(*_batch(world))[1] for _ in range(3)]
    assert not any(r["reset"] for r in records) and trainer.resets == 0


# ----- online ------------------------------------------------------------------------------
def test_stream_predicts_each_frame_before_updating_on_it(world):
    model = load(world["runs"]["dpft"])
    frames = [np.array(Image.open(p)) for p in sorted(world["target"].iterdir())]
    x = torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float()
    with torch.no_grad():  # the source teacher's flip-averaged prediction
        p = torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1).flip(-1)
    expected = p.argmax(1)[0].numpy()
    before = tensors(model)
    # the teacher of the image and its flip (its multi-scale default: the teacher_scales test)
    stream = adapt_stream(model, enumerate(frames), lr=1e-2, teacher_scales=[1], **LOOSE)
    preds = [f.labels for f in stream]
    assert len(preds) == 4 and preds[0].shape == frames[0].shape[:2]
    assert np.array_equal(preds[0], expected)
    assert changed_names(before, tensors(model))  # the deployed teacher moved
    # segmented smaller (short side 32 instead of 40), labelled at the frame's own size
    small = list(adapt_stream(model, enumerate(frames[:2]), method="tent", resize_short=32))
    assert [f.labels.shape for f in small] == [(40, 48)] * 2 and small[1].key == 1


def test_evaluate_stream_scores_the_predictions_made_before_each_step(world):
    from pivotseg.config import EvalConfig
    from pivotseg.data import build_dataset
    from pivotseg.data.transforms import eval_transforms
    from pivotseg.tasks.adapt import evaluate_stream
    from pivotseg.tasks.dgss.evaluate import evaluate_datasets

    data = build_dataset(world["src"], "folder", "train", transform=eval_transforms())
    run = world["runs"]["rein"]
    offline = evaluate_datasets(load(run), {"d": data}, EvalConfig(mode="whole"))["targets"]["d"]
    # TENT predicts with the forward before its step; steps too small to flip an argmax leave
    # the stream's score equal to plain whole-image evaluation
    still = evaluate_stream(load(run), data, method="tent", lr=1e-12)
    assert still["miou"] == offline["miou"] and still["iou"] == offline["iou"]
    assert still["frames"] == len(data) == 4 and still["classes"] == ["red", "green", "blue"]
    # large steps change what is predicted after the first frame, and so the score
    moved = evaluate_stream(load(run), data, method="tent", lr=1.0)
    assert moved["acc"] != offline["acc"]


def test_predict_adapt_writes_one_label_map_per_frame(world, tmp_path, capsys):
    run = world["runs"]["dpft"]
    before = digest(run)
    out = tmp_path / "p"
    assert main(["predict", str(run), str(world["target"]), "--out", str(out), "--adapt"]) == 0
    labels = sorted(out.glob("*.png"))
    assert [p.name for p in labels] == [p.name for p in sorted(world["target"].iterdir())]
    assert np.array(Image.open(labels[0])).shape == (40, 48)
    assert digest(run) == before  # the stream adapts a copy in memory, never the run
    code = main(["predict", str(world["runs"]["frozen"]), str(world["target"]), "--out",
                 str(tmp_path / "q"), "--adapt", "--adapt-method", "spl"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the first run's progress
    assert code == 2 and err.startswith("pivotseg: error: a frozen run cannot adapt with spl")


# ----- bad input -----------------------------------------------------------------------------
def test_a_method_that_cannot_adapt_names_those_that_can(world, tmp_path):
    model = load(world["runs"]["frozen"])
    for method in ("spl", "selftrain"):
        with pytest.raises(ConfigError) as err:
            build_adapter(model, AdaptSettings(method=method))
        message = str(err.value)
        assert "frozen run cannot adapt" in message and "\n" not in message
        assert "spl adapts dpft" in message and "selftrain adapts rein, dpft" in message
    run = world["runs"]["rein"]
    with pytest.raises(ConfigError, match="rein run cannot adapt with spl"):
        adapt_run(run, world["target"], tmp_path / "x", method="spl", progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_image_folders_are_one_line_errors(world, tmp_path):
    run = world["runs"]["dpft"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"{empty}: no images"):
        adapt_run(run, empty, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="not a folder"):
        adapt_run(run, tmp_path / "missing", tmp_path / "a", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "frame.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="frame.png: cannot read"):
        adapt_run(run, broken, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(ConfigError, match="exists already"):
        adapt_run(run, world["target"], taken, progress=False)


def test_cli_prints_one_line_for_bad_input(world, tmp_path, capsys):
    code = main(["adapt", str(world["runs"]["frozen"]), "--images", str(world["target"]),
                 "--out", str(tmp_path / "o"), "--method", "spl"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("pivotseg: error:") and "\n" not in err
    assert "dpft" in err


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_adaptation_leaves_nothing_half_written(world, tmp_path, monkeypatch, error):
    run = world["runs"]["dpft"]
    before = digest(run)
    real_step = SelfTrainer.step  # offline self-training is source-free by default
    calls = []

    def failing_step(self, images, valid):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real_step(self, images, valid)

    monkeypatch.setattr(SelfTrainer, "step", failing_step)
    with pytest.raises(type(error)):
        adapt_run(run, world["target"], tmp_path / "new", steps=3, progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the run nor its temporary folder
    assert digest(run) == before


def test_a_killed_adaptation_is_cleaned_up_and_a_running_one_left_alone(world, tmp_path):
    dead = tmp_path / ".new.adapting-999999999"  # no such process
    running = tmp_path / f".new.adapting-{os.getppid()}"  # a live process
    for folder in (dead, running):
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("{}\n")
    adapt_run(world["runs"]["rein"], world["target"], tmp_path / "new", steps=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new", running.name])


def test_cli_adapts_into_a_new_run(world, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["adapt", str(world["runs"]["rein"]), "--images", str(world["target"]),
                 "--out", str(out), "--steps", "2", "--method", "tent"])  # fmt: skip
    assert code == 0
    assert f"with tent on 4 images (2 steps, 0 resets) -> {out}" in capsys.readouterr().out
    assert json.loads((out / "adapt.json").read_text())["settings"]["steps"] == 2


def test_teacher_scales_average_the_flipped_views_at_each_scale(world):
    model = load(world["runs"]["rein"])
    images, valid = _batch(world)  # 40 x 48
    seen = []
    forward = model.forward

    def recording(x):
        seen.append(tuple(x.shape[-2:]))
        return forward(x)

    model.forward = recording
    trainer = SelfTrainer(model, AdaptSettings(teacher_scales=[1, 2], **LOOSE), pivots=False)
    probs, plain, _, _ = trainer._predict(images)
    # teacher at 1 (plain, flip), source at 1 for the drift guard, teacher at 2 (plain, flip)
    assert sorted(seen) == [(40, 48), (40, 48), (40, 48), (80, 96), (80, 96)]
    with torch.no_grad():
        large = torch.nn.functional.interpolate(images, scale_factor=2.0, mode="bilinear")
        views = [forward(images), forward(images.flip(-1)).flip(-1)]
        views += [forward(large), forward(large.flip(-1)).flip(-1)]
        by_hand = [
            torch.nn.functional.interpolate(v.softmax(1), size=(40, 48), mode="bilinear")
            for v in views
        ]
    assert torch.allclose(probs, torch.stack(by_hand).mean(0), atol=1e-6)
    assert torch.allclose(plain, by_hand[0], atol=1e-6)
    with pytest.raises(ConfigError, match="1 among them"):
        AdaptSettings(teacher_scales=[0.75, 1.25])


def test_target_images_are_sized_as_predict_sizes_them(world, tmp_path, monkeypatch):
    """A frame smaller than the model's minimum side is enlarged (its 0.75 teacher view too),
    a very wide one capped at the run's data.max_size (2048), as ``pivotseg predict`` does."""
    import pivotseg.tasks.adapt.offline as offline
    from pivotseg.tasks.dgss.predict import min_input_side

    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).save(folder / "a_tiny.png")
    Image.fromarray(rng.integers(0, 255, (40, 2200, 3), dtype=np.uint8)).save(folder / "b_wide.png")
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(folder / "c_grey.png")
    stacked, stack = [], offline.stack
    monkeypatch.setattr(offline, "stack", lambda b, *a: stacked.extend(b) or stack(b, *a))
    run = world["runs"]["rein"]
    out = adapt_run(run, folder, tmp_path / "out", steps=3, progress=False, method="selftrain")
    assert json.loads((out / "adapt.json").read_text())["settings"]["steps"] == 3
    side = min_input_side(load(run))
    assert side > 7  # the tiny frame really is below it
    sizes = {im.shape[1]: im.shape[:2] for im in stacked}  # by width: 48 grey, the others
    assert sizes.pop(48) == (40, 48)  # a grey frame, read as RGB at its own size
    assert sizes.pop(2048) == (37, 2048)  # 40 x 2200 scaled by 2048 / 2200
    assert list(sizes.values()) == [(side, int(7 * side / 5 + 0.5))]  # 5 x 7, keep-ratio


def test_the_stream_sizes_frames_as_predict_does_by_default(world):
    model = load(world["runs"]["rein"])
    tiny = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    frames = list(adapt_stream(model, [("tiny", tiny)], method="selftrain"))
    assert frames[0].labels.shape == (5, 7)  # segmented enlarged, brought back to its size
