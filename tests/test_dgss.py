"""DGSS task end to end on tiny random DINOv2s and tiny folder datasets written here.

Every tuning method x head trains (loss falls on a fixed batch) and changes exactly the
parameters the method claims; the evaluation logged during training equals a fresh evaluation
of the saved checkpoint; an interrupted run resumed gives the metrics of an uninterrupted one;
two processes under torchrun reproduce one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pivotseg.config import RunConfig, config_from_dict, config_to_dict
from pivotseg.engine import NonFiniteLoss, read_metrics
from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT
from pivotseg.segmenter import build_segmenter, load_segmenter
from pivotseg.tasks.dgss import evaluate, train
from tests.helpers import TINY_HEAD_ARGS, TINY_METHOD_ARGS, tiny_vit_config

TINY_DINOV2 = tiny_vit_config()
HEAD_ARGS = TINY_HEAD_ARGS
METHOD_ARGS = TINY_METHOD_ARGS
METHODS = list(METHOD_ARGS)
HEADS = list(HEAD_ARGS)
CLASSES = ["red", "green", "blue"]
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def make_folder_dataset(root: Path, splits: dict[str, int], seed: int = 0, shift: int = 0):
    """Images of three vertical colour bands (classes 0/1/2) at random widths, 40x48 pixels.

    A few top rows are labelled 255 (ignore). ``shift`` brightens a "target domain".
    """
    rng = np.random.default_rng(seed)
    h, w = 40, 48
    for split, count in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = np.zeros((h, w), np.uint8)
            a, b = sorted(rng.choice(np.arange(8, w - 8), 2, replace=False))
            label[:, a:b] = 1
            label[:, b:] = 2
            colour = COLOURS[label] + shift + rng.normal(0, 12, (h, w, 3))
            label[: rng.integers(0, 6)] = 255
            image = colour.clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dgss_data")
    make_folder_dataset(root / "src", {"train": 4, "val": 2})
    make_folder_dataset(root / "fixed", {"train": 2})
    make_folder_dataset(root / "tgt", {"val": 3}, seed=1, shift=25)
    return root


def config_dict(data_root: Path, run_dir: Path, method="frozen", head="fpn") -> dict:
    head_args = dict(HEAD_ARGS[head])
    if method == "dpft":  # DPFT's own queries (a count of their own) replace the head's
        head_args.pop("num_queries", None)
    return {
        "model": {
            "num_classes": 3,
            "backbone": "dinov2",
            "backbone_config": dict(TINY_DINOV2),
            "method": method,
            "method_args": dict(METHOD_ARGS[method]),
            "head": head,
            "head_args": head_args,
        },
        "data": {
            "source": {"path": str(data_root / "src"), "format": "folder", "split": "train"},
            "val": {"path": str(data_root / "src"), "format": "folder", "split": "val"},
            "targets": [
                {"path": str(data_root / "tgt"), "format": "folder", "split": "val", "name": "tgt"}
            ],
            "crop_size": 32,
            "scales": [32, 40],
            "num_workers": 0,
        },
        "train": {
            "iterations": 8,
            "global_batch_size": 2,
            "lr": 1e-3,
            "eval_every": 4,
            "checkpoint_every": 4,
            "log_every": 1,
        },
        "eval": {"mode": "slide", "crop": 32, "stride": 24, "batch_size": 4},
        "run_dir": str(run_dir),
    }


def make_config(data_root, run_dir, method="frozen", head="fpn", overrides=()) -> RunConfig:
    return config_from_dict(config_dict(data_root, run_dir, method, head), list(overrides))


def no_time(records):
    return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in records]


FIXED_BATCH = [  # the same two whole images every step: no resize, crop, flip or colour jitter
    "data.source.path={fixed}",
    "data.crop_size=[40,48]",
    "data.scales=[40]",
    "data.flip=false",
    "data.photometric=false",
    "train.iterations=30",
    "train.lr=3e-3",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("method", METHODS)
def test_method_head_trains_what_it_claims(data_root, tmp_path, method, head):
    overrides = [o.format(fixed=data_root / "fixed") for o in FIXED_BATCH]
    cfg = make_config(data_root, tmp_path / "run", method, head, overrides)
    initial = build_segmenter(cfg.model, seed=cfg.seed)  # as train() builds it
    claimed = {n for n, _ in initial.tuning.trainable_parameters()}
    claimed |= {f"head.{n}" for n, p in initial.head.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in initial.named_parameters()}

    run = train(cfg)

    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
    trained = load_segmenter(run / "checkpoints" / "last")
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert changed == claimed, (sorted(changed ^ claimed)[:5], method)
    backbone_changed = {n for n in changed if n.startswith("backbone.")}
    if method in ("frozen", "rein", "dpft"):
        assert not backbone_changed
    elif method == "lora":
        assert backbone_changed and all(".lora_" in n for n in backbone_changed)
    else:  # full: every block parameter (unused ones, e.g. the final norm, stay frozen)
        blocks = {n for n in before if n.startswith("backbone.model.encoder.layer.")}
        assert blocks and blocks <= backbone_changed
    # the evaluation logged at the end equals a fresh evaluation of the saved checkpoint
    logged = [r["eval"] for r in read_metrics(run) if "eval" in r][-1]
    again = evaluate(run, verbose=False)
    assert again["targets"] == logged["targets"]


@pytest.mark.parametrize("method, head", [("dpft", "mask2former"), ("full", "fpn")])
def test_resume_repeats_the_uninterrupted_run(data_root, tmp_path, method, head):
    full = train(make_config(data_root, tmp_path / "full", method, head))
    part = tmp_path / "part"
    train(make_config(data_root, part, method, head), stop_at=3)
    assert [r["iter"] for r in read_metrics(part)][-1] == 3
    # the resumed process rebuilds everything from the config, as `pivotseg train --resume` does
    train(make_config(data_root, part, method, head), resume=part)
    assert no_time(read_metrics(part)) == no_time(read_metrics(full))
    a = load_segmenter(full / "checkpoints" / "last").trainable_state_dict()
    b = load_segmenter(part / "checkpoints" / "last").trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_contents(data_root, tmp_path):
    run = train(make_config(data_root, tmp_path / "run", overrides=["train.iterations=4"]))
    assert (run / "config.yaml").is_file() and (run / "env.json").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    expected = config_to_dict(make_config(data_root, run, overrides=["train.iterations=4"]))
    expected["model"]["class_names"] = CLASSES  # filled in from the dataset
    assert saved == expected
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000004", "last"]
    evals = [r for r in read_metrics(run) if "eval" in r]
    assert [r["iter"] for r in evals] == [4]
    record = evals[0]["eval"]
    assert set(record) == {"val", "targets", "mean_miou"} and list(record["targets"]) == ["tgt"]
    assert record["mean_miou"] == record["targets"]["tgt"]["miou"]
    assert len(record["targets"]["tgt"]["iou"]) == 3


def test_existing_run_folder_is_not_overwritten(data_root, tmp_path):
    cfg = make_config(data_root, tmp_path / "run", overrides=["train.iterations=1"])
    train(cfg)
    with pytest.raises(ConfigError, match="holds a run already; continue it with --resume"):
        train(make_config(data_root, tmp_path / "run", overrides=["train.iterations=1"]))


def test_class_count_must_match_the_data(data_root, tmp_path):
    cfg = make_config(data_root, tmp_path / "run", overrides=["model.num_classes=4"])
    with pytest.raises(ConfigError, match="set model.num_classes=3"):
        train(cfg)


def test_nan_loss_names_iteration_and_checkpoint(data_root, tmp_path):
    cfg = make_config(data_root, tmp_path / "run", overrides=["train.lr=.inf"])
    with pytest.raises(NonFiniteLoss) as err:
        train(cfg)
    message = str(err.value)
    assert "at iteration 2" in message and "none saved yet" in message
    assert f"--resume {tmp_path / 'run'}" in message and "\n" not in message


def _torchrun(args, tmp_path, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pivotseg", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_reproduce_one(data_root, tmp_path):
    """torchrun x2 (gloo) = one process accumulating two micro-batches, and sharded eval."""
    # no dropout: its random draws differ between one stream and two per-process streams
    same = ["train.per_device_batch_size=1", "model.head_args.dropout=0"]
    one = make_config(data_root, tmp_path / "one", overrides=same)
    train(one)
    two_cfg = tmp_path / "two.yaml"
    data = config_dict(data_root, tmp_path / "two")
    data["train"]["per_device_batch_size"] = 1
    data["model"]["head_args"]["dropout"] = 0
    two_cfg.write_text(yaml.safe_dump(data))
    _torchrun(["train", str(two_cfg)], tmp_path)
    two = tmp_path / "two"
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    rec_one, rec_two = read_metrics(one.run_dir), read_metrics(two)
    loss_one = [r["loss"] for r in rec_one if "loss" in r]
    loss_two = [r["loss"] for r in rec_two if "loss" in r]
    # the same global batches and gradients: equal up to float summation order (here: exactly)
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
    eval_one = [r["eval"] for r in rec_one if "eval" in r]
    eval_two = [r["eval"] for r in rec_two if "eval" in r]
    for a, b in zip(eval_one, eval_two):
        assert b["targets"]["tgt"]["miou"] == pytest.approx(a["targets"]["tgt"]["miou"], abs=1e-3)
    # evaluation alone: the two shards of the same checkpoint sum to the one-process result
    out = tmp_path / "eval.json"
    _torchrun(["eval", str(two), "--json", str(out), "--workers", "0"], tmp_path)
    sharded = json.loads(out.read_text())
    evaluate(two, verbose=False, output=tmp_path / "whole.json")
    assert sharded["datasets"] == json.loads((tmp_path / "whole.json").read_text())["datasets"]
