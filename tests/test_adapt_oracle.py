"""bench/adapt_oracle.py: the label-trained student (what it changes, what it learns) and its
report, on a tiny Rein segmenter and a three-band dataset written here."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from bench.adapt_oracle import oracle_train, report
from pivotseg.config import EvalConfig
from pivotseg.data import build_dataset
from pivotseg.data.transforms import eval_transforms
from pivotseg.segmenter import build_segmenter
from pivotseg.tasks.adapt.params import norm_affine_parameters
from pivotseg.tasks.dgss.evaluate import evaluate_datasets
from tests.helpers import TINY_HEAD_ARGS, TINY_METHOD_ARGS, tiny_vit_config
from tests.test_adapt import write_images


def _segmenter():
    cfg = {
        "num_classes": 3,
        "class_names": ["red", "green", "blue"],
        "backbone": "dinov2",
        "backbone_config": tiny_vit_config(),
        "method": "rein",
        "method_args": dict(TINY_METHOD_ARGS["rein"]),
        "head": "fpn",
        "head_args": dict(TINY_HEAD_ARGS["fpn"]),
    }
    return build_segmenter(cfg, seed=0).eval()


def _dataset(tmp_path):
    write_images(tmp_path / "images" / "train", 3, 0, 40, labels=tmp_path / "labels" / "train")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["red", "green", "blue"]}))
    return build_dataset(tmp_path, "folder", "train", transform=eval_transforms())


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}


def test_the_oracle_trains_the_default_student_only_and_learns_the_labels(tmp_path):
    data = _dataset(tmp_path)
    model = _segmenter()
    backbone, head, tuning = (_snapshot(m) for m in (model.backbone, model.head, model.tuning))
    miou = evaluate_datasets(model, {"t": data}, EvalConfig(mode="whole"))["targets"]["t"]["miou"]
    losses = oracle_train(model, data, steps=30, seed=0, head=True)
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    after = evaluate_datasets(model, {"t": data}, EvalConfig(mode="whole"))["targets"]["t"]
    assert after["miou"] > miou + 10  # it fits the frames it was given labels for
    assert _changed(head, model.head) == set(head)
    assert _changed(tuning, model.tuning)  # Rein's tokens are its adaptable parameters
    # the frozen backbone moves only in its normalisation layers' affine parameters
    moved = _changed(backbone, model.backbone)
    assert moved and all("norm" in n.lower() for n in moved)
    assert all(p.requires_grad is False for p in model.backbone.parameters())


def test_without_the_head_only_the_heads_normalisation_layers_move(tmp_path):
    model = _segmenter()
    head = _snapshot(model.head)
    oracle_train(model, _dataset(tmp_path), steps=2, seed=0, head=False)
    norms = {name for name, _ in norm_affine_parameters(model.head)}
    assert norms and _changed(head, model.head) == norms  # the default student adapts norms


def _row(seed, adaptation, miou, val):
    return dict(target="idd", run="dpft", seed=seed, adaptation=adaptation, miou=miou,
                source_val=val)  # fmt: skip


def test_report_pairs_each_oracle_with_source_only_and_says_whether_it_reaches_the_bar():
    rows = []
    for seed, base in enumerate([40.0, 41.0, 39.0]):
        rows += [
            _row(seed, "source only", base, 58.0),
            _row(seed, "oracle, 40 steps", base + 1.0 + 0.1 * seed, 58.5),  # +1.0, +1.1, +1.2
            _row(seed, "oracle + head, 40 steps", base + 4.0, 57.0),
        ]
    result = {"rows": rows, "frames": {"idd": {"adapt": 109, "score": 95}}, "targets": ["idd"]}
    text = report(result)
    assert "| dpft oracle, 40 steps − dpft source only | +1.10 [" in text
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert f"[{1.1 - half:+.2f}, {1.1 + half:+.2f}]" in text
    assert "oracle, 40 steps: with the true labels the student gains +1.10" in text
    assert "below +3 even at the top of its interval: perfect pseudo-labels" in text
    assert "oracle + head, 40 steps: with the true labels the student gains +4.00" in text
    assert "+3 or more on average" in text
    rows[-4]["miou"] = 41.0  # the head row at seed 1: +0.0, so +4, +0, +4: mean +2.67, wide
    assert "below +3 on average, though its interval reaches above it" in report(result)
    assert (
        "| dpft oracle + head, 40 steps − dpft source only | +4.00 [+4.00, +4.00] | -1.00" in text
    )


def test_report_weighs_the_source_val_limit_and_orders_budgets_by_steps():
    rows = []
    for seed, base in enumerate([40.0, 41.0, 39.0]):
        rows += [
            _row(seed, "source only", base, 58.0),
            _row(seed, "oracle, 200 steps", base + 4.0, 58.0 - 3.0 - seed),  # source val -4
            _row(seed, "oracle, 40 steps", base + 4.0, 58.0),
        ]
    text = report({"rows": rows, "frames": {}, "targets": ["idd"]})
    assert "oracle, 200 steps: with the true labels the student gains +4.00" in text
    assert "source val falls by 4.00, beyond the bar's limit of 2" in text
    assert (
        "oracle, 40 steps: with the true labels the student gains +4.00 [+4.00, +4.00] mIoU; "
        "+3 or more on average: the bar is within this student's reach" in text
    )
    # 40 steps before 200 (numbers, not strings), in the table and in the paired lines
    assert text.index("| dpft | 0 | oracle, 40 steps") < text.index(
        "| dpft | 0 | oracle, 200 steps"
    )
    assert text.index("- dpft, oracle, 40 steps") < text.index("- dpft, oracle, 200 steps")
