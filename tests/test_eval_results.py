"""One result schema (docs/evaluation.md): percent, scores by class name, ``null`` for an
undefined IoU, strict JSON; the per-class table of ``pivotseg eval``; the one-seed display of
``bench dg``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pivotseg.benchmarking.benchmark import RunResult, chart_title, format_tables, summarise
from pivotseg.config import EvalConfig
from pivotseg.evaluation import ConfusionMatrix
from pivotseg.evaluation.results import (
    SCHEMA,
    confusion_entry,
    named_scores,
    results_document,
    to_json,
    write_json,
)
from pivotseg.tasks.dgss.evaluate import evaluate_datasets, format_table, results_json

CLASSES = ["road", "car", "sky", "tree"]
# One frame of seven pixels (label, prediction); the last pixel is ignored (255).
LABEL = [0, 0, 0, 1, 1, 2, 255]
PRED = [0, 0, 1, 1, 0, 2, 3]
# By hand: road TP 2, 3 labelled, 3 predicted -> 2 / 4; car 1 / (2 + 2 - 1); sky 1 / 1; tree
# is in neither labels nor predictions -> undefined. Pixel accuracy 4 / 6; class accuracy
# road 2/3, car 1/2, sky 1.
EXPECTED_IOU = {"road": 50.0, "car": 100 / 3, "sky": 100.0, "tree": None}
EXPECTED_MIOU = (50.0 + 100 / 3 + 100.0) / 3
EXPECTED_ACC = 400 / 6
EXPECTED_MACC = 100 * (2 / 3 + 1 / 2 + 1) / 3


def refuse_nan(text):
    raise ValueError(f"bare {text} in the JSON")


def strict_loads(text: str):
    return json.loads(text, parse_constant=refuse_nan)


class PixelsSayTheClass(nn.Module):
    """A 'model' whose prediction is written in the image: class = value of channel 0."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.config = SimpleNamespace(num_classes=num_classes, class_names=None)

    def forward(self, images):
        classes = images[:, 0].long()
        return nn.functional.one_hot(classes, self.config.num_classes).permute(0, 3, 1, 2).float()


class Frames:
    """A dataset of 1 x N frames: ``(label row, prediction row)`` each."""

    def __init__(self, frames, classes=CLASSES):
        self.frames, self.classes = frames, classes

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        label, pred = self.frames[i]
        image = torch.tensor(pred, dtype=torch.float32).reshape(1, 1, -1).expand(3, 1, -1)
        return {"image": image.clone(), "label": torch.tensor([label]), "meta": {}}


def score(frames, limit=None) -> dict:
    return evaluate_datasets(
        PixelsSayTheClass(len(CLASSES)), {"tgt": Frames(frames)}, EvalConfig(limit=limit)
    )


def check_entry(entry):
    assert entry["per_class"].keys() == EXPECTED_IOU.keys()  # named, in the dataset's order
    for name, expected in EXPECTED_IOU.items():
        if expected is None:
            assert entry["per_class"][name] is None
        else:
            assert entry["per_class"][name] == pytest.approx(expected)
    assert entry["miou"] == pytest.approx(EXPECTED_MIOU)
    assert entry["acc"] == pytest.approx(EXPECTED_ACC)
    assert entry["macc"] == pytest.approx(EXPECTED_MACC)


def test_eval_json_of_a_hand_computed_confusion_matrix(tmp_path):
    record = score([(LABEL, PRED)])
    path = write_json(tmp_path / "eval.json", results_json(record, checkpoint="runs/x"))
    text = path.read_text()
    assert "NaN" not in text
    document = strict_loads(text)
    assert document["schema"] == SCHEMA and document["task"] == "eval"
    assert document["units"] == "percent" and document["checkpoint"] == "runs/x"
    (entry,) = document["datasets"]
    assert (entry["name"], entry["frames"], entry["limit"]) == ("tgt", 1, None)
    check_entry(entry)
    assert document["mean_miou"] == pytest.approx(EXPECTED_MIOU)


def test_ovseg_entry_from_the_matrix_has_the_same_values():
    matrix = ConfusionMatrix(len(CLASSES))
    matrix.update(torch.tensor(PRED), torch.tensor(LABEL))
    entry = confusion_entry("tgt", matrix.compute(), CLASSES, frames=1, limit=None)
    check_entry(strict_loads(to_json(results_document("ovseg", [entry])))["datasets"][0])


def test_nan_anywhere_becomes_null_and_the_file_is_strict_json():
    nan = float("nan")
    document = results_document(
        "ovseg",
        [
            {
                "name": "x",
                "frames": 2,
                "limit": 2,
                "miou": nan,
                "per_class": named_scores(["a", "b"], [nan, 12.5]),
            }
        ],
        note=[nan, math.inf],
    )
    parsed = strict_loads(to_json(document))
    assert parsed["datasets"][0]["miou"] is None and parsed["mean_miou"] is None
    assert parsed["datasets"][0]["per_class"] == {"a": None, "b": 12.5}
    assert parsed["note"] == [None, None]
    with pytest.raises(ValueError, match="bare NaN"):
        strict_loads(json.dumps({"iou": [nan]}))  # what `pivotseg eval --json` wrote before


def test_repeated_class_names_keep_every_score():
    assert named_scores(["car", "car", "sky"], [1.0, 2.0, 3.0]) == {
        "car": 1.0,
        "car (2)": 2.0,
        "sky": 3.0,
    }


def test_eval_table_lists_frames_and_per_class_iou():
    table = format_table(score([(LABEL, PRED)]), per_class=True)
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "frames", "mIoU", "aAcc", "mAcc"]
    assert lines[1].split() == ["tgt", "1", f"{EXPECTED_MIOU:.2f}", "66.67", "72.22"]
    assert "per-class IoU on tgt" in table
    assert "  road    50.00" in lines and "  car     33.33" in lines
    assert "  tree        –" in lines
    assert "limited" not in table


def one_seed_summary():
    run = RunResult("dpft", 0, "x", 50.0, {"a": 40.0}, 40.0, {"a": [40.0]}, 10, 0.5, 100.0)
    return summarise([run])


def test_one_seed_prints_no_spread_and_says_so():
    summary = one_seed_summary()
    table = format_tables(summary, {"a": ["road"]})
    assert "| dpft | 50.0 | 40.0 | 40.0 | 0.00M |" in table
    assert "±" not in table.split("\n\n")[0]
    assert "Per-class IoU on a (one seed;" in table
    assert chart_title(summary) == "Domain generalisation: mIoU per target (one seed)"


def test_several_seeds_keep_mean_and_std():
    runs = [
        RunResult("dpft", s, "x", 50.0, {"a": v}, v, {"a": [v]}, 10, 0.5, 100.0)
        for s, v in ((0, 40.0), (1, 44.0))
    ]
    summary = summarise(runs)
    assert "| dpft | 50.0 ± 0.0 | 42.0 ± 2.8 | 42.0 ± 2.8 |" in format_tables(summary, {})
    assert chart_title(summary).endswith("(mean ± std over seeds)")


def test_table_of_a_logged_record_shows_undefined_scores():
    # metrics.jsonl stores NaN as null; the demo prints its last record with format_table.
    logged = {"miou": None, "acc": None, "macc": None, "iou": [None], "classes": ["a"]}
    table = format_table({"targets": {"t": {**logged, "frames": 1}}, "mean_miou": None}, True)
    assert table.splitlines()[1].split() == ["t", "1", "–", "–", "–"]
    assert table.splitlines()[-1].split() == ["a", "–"]
