"""IDD Lite (7 IDD level-1 classes): the format, and scoring CamVid / Cityscapes models on it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pivotseg.config import DatasetSpec, EvalConfig
from pivotseg.data import build_dataset, scan_dataset
from pivotseg.data.taxonomy import (
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    IDD_LEVEL1_CLASSES,
    class_mapping,
    convert_logits,
    unmapped_classes,
)
from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.dgss.evaluate import TaxonomyBridge, evaluate_datasets, open_eval_datasets
from tests.conftest import require_shared

IDD = IDD_LEVEL1_CLASSES
CS = CITYSCAPES_CLASSES

# Written out by hand from IDD's anue_labels.py (/work/shared/README.md quotes it).
CITYSCAPES_TO_IDD = {
    "road": "drivable", "sidewalk": "non-drivable", "building": "far objects",
    "wall": "road-side objects", "fence": "road-side objects", "pole": "road-side objects",
    "traffic light": "road-side objects", "traffic sign": "road-side objects",
    "vegetation": "far objects", "terrain": "non-drivable", "sky": "sky",
    "person": "living things", "rider": "living things", "car": "vehicles",
    "truck": "vehicles", "bus": "vehicles", "train": "vehicles", "motorcycle": "vehicles",
    "bicycle": "vehicles",
}  # fmt: skip
CAMVID_TO_IDD = {
    "Sky": "sky", "Building": "far objects", "Pole": "road-side objects", "Road": "drivable",
    "Pavement": "non-drivable", "Tree": "far objects", "SignSymbol": "road-side objects",
    "Fence": "road-side objects", "Car": "vehicles", "Pedestrian": "living things",
    "Bicyclist": "living things",
}  # fmt: skip

GREY_STEP = 12  # image grey level = GREY_STEP * (model class): survives JPEG on flat blocks


def write_idd(root: Path, frames: dict[str, dict[str, np.ndarray]]) -> None:
    """``frames[seq][id] = label`` (uint8 level-1 ids); images are flat grey."""
    for seq, items in frames.items():
        for frame_id, label in items.items():
            image_dir = root / "leftImg8bit" / "val" / seq
            label_dir = root / "gtFine" / "val" / seq
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            grey = np.full((*label.shape, 3), 90, np.uint8)
            Image.fromarray(grey).save(image_dir / f"{frame_id}_image.jpg", quality=95)
            Image.fromarray(label.astype(np.uint8)).save(label_dir / f"{frame_id}_label.png")


@pytest.fixture
def idd_root(tmp_path):
    labels = np.array([[0, 1, 2, 3], [4, 5, 6, 255]], np.uint8).repeat(4, 0).repeat(4, 1)
    write_idd(tmp_path, {"3": {"000120": labels, "000121": labels[::-1]}, "181": {"0042": labels}})
    # IDD Lite ships test images without labels: not a split to score on.
    (tmp_path / "leftImg8bit" / "test" / "7").mkdir(parents=True)
    return tmp_path


def test_reads_pairs_by_sequence_and_id(idd_root):
    ds = build_dataset(idd_root, "idd_lite")
    assert ds.classes == IDD and ds.domain == "idd_lite" and len(ds) == 3
    metas = sorted((ds[i]["meta"]["domain"], Path(ds[i]["meta"]["path"]).name) for i in range(3))
    assert metas == [
        ("181", "0042_image.jpg"),
        ("3", "000120_image.jpg"),
        ("3", "000121_image.jpg"),
    ]
    for i in range(3):
        item = ds[i]
        assert item["meta"]["split"] == "val"
        assert Path(item["meta"]["label_path"]).name == Path(item["meta"]["path"]).name.replace(
            "_image.jpg", "_label.png"
        )
    item = next(ds[i] for i in range(3) if ds[i]["meta"]["path"].endswith("000121_image.jpg"))
    assert item["label"][0].tolist() == [4] * 4 + [5] * 4 + [6] * 4 + [255] * 4
    assert len(build_dataset(idd_root, "idd_lite", split="val")) == 3
    with pytest.raises(DataError, match="no split 'test'"):
        build_dataset(idd_root, "idd_lite", split="test")


def test_an_unpaired_frame_and_an_undefined_id_are_reported(idd_root):
    (idd_root / "gtFine" / "val" / "3" / "000121_label.png").unlink()
    with pytest.raises(DataError, match="000121_image.jpg: image has no label"):
        build_dataset(idd_root, "idd_lite")
    bad = np.full((8, 16), 7, np.uint8)
    write_idd(idd_root, {"3": {"000121": bad}})
    ds = build_dataset(idd_root, "idd_lite")
    index = next(i for i, s in enumerate(ds.samples) if s.label.name == "000121_label.png")
    with pytest.raises(DataError, match=r"000121_label.png: label values 7 .*idd_lite ids 0-6"):
        ds[index]
    report = scan_dataset(idd_root, "idd_lite", progress=False)
    assert [p.kind for p in report.problems] == ["values outside classes"]


def test_mapping_tables_onto_idd_level1():
    by_name = {CS[s]: IDD[t] for s, t in class_mapping(CS, IDD).items() if t is not None}
    assert by_name == CITYSCAPES_TO_IDD
    by_name = {CAMVID_CLASSES[s]: IDD[t] for s, t in class_mapping(CAMVID_CLASSES, IDD).items()}
    assert by_name == CAMVID_TO_IDD
    assert unmapped_classes(CS, IDD) == [] and unmapped_classes(CAMVID_CLASSES, IDD) == []


def test_camvid_logits_merge_onto_idd():
    # Car is CamVid's argmax, but Building + Tree together outweigh it: far objects wins.
    logits = torch.full((1, 11, 1, 2), -4.0)
    car, building, tree = (CAMVID_CLASSES.index(c) for c in ("Car", "Building", "Tree"))
    logits[0, car, 0, 0], logits[0, building, 0, 0], logits[0, tree, 0, 0] = 2.2, 2.0, 1.8
    logits[0, CAMVID_CLASSES.index("Bicyclist"), 0, 1] = 3.0
    out = convert_logits(logits, CAMVID_CLASSES, IDD)
    assert [IDD[int(k)] for k in out.argmax(1).flatten()] == ["far objects", "living things"]
    probs = torch.softmax(logits, 1)[0, :, 0, 0]
    torch.testing.assert_close(
        torch.softmax(out, 1)[0, IDD.index("far objects"), 0, 0], probs[building] + probs[tree]
    )
    torch.testing.assert_close(torch.softmax(out, 1).sum(1), torch.ones(1, 1, 2))


def test_cityscapes_logits_merge_onto_idd():
    logits = torch.full((1, 19, 1, 3), -4.0)
    logits[0, CS.index("bus"), 0, 0] = 3.0
    logits[0, CS.index("wall"), 0, 1] = 3.0
    logits[0, CS.index("building"), 0, 1] = 2.9  # alone it loses to wall
    logits[0, CS.index("terrain"), 0, 2] = 3.0
    out = convert_logits(logits, CS, IDD)
    assert [IDD[int(k)] for k in out.argmax(1).flatten()] == [
        "vehicles",
        "road-side objects",
        "non-drivable",
    ]
    vehicles = [CS.index(c) for c in ("car", "truck", "bus", "train", "motorcycle", "bicycle")]
    torch.testing.assert_close(
        out[0, IDD.index("vehicles")], torch.logsumexp(logits[0, vehicles], 0)
    )


class GreyOracle(nn.Module):
    """Predicts model class ``k`` where the image's grey level is ``GREY_STEP * k``."""

    def __init__(self, class_names: list[str]):
        super().__init__()
        self.config = SimpleNamespace(class_names=class_names, num_classes=len(class_names))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        centres = GREY_STEP * torch.arange(self.config.num_classes, dtype=torch.float32)
        grey = images.mean(1, keepdim=True)
        return -((grey - centres[None, :, None, None]) ** 2)


@pytest.mark.parametrize(
    ("model_classes", "hand_table"),
    [(CAMVID_CLASSES, CAMVID_TO_IDD), (CS, CITYSCAPES_TO_IDD)],
    ids=["camvid", "cityscapes"],
)
def test_a_model_of_another_taxonomy_is_scored_on_idd(tmp_path, model_classes, hand_table):
    # Every model class paints one 16x16 block; the IDD label is the hand table's class there.
    n = len(model_classes)
    grey = (GREY_STEP * np.arange(n, dtype=np.uint8)).repeat(16)[None].repeat(16, 0)
    label = np.array([IDD.index(hand_table[c]) for c in model_classes], np.uint8)
    label = label.repeat(16)[None].repeat(16, 0)
    image_dir, label_dir = tmp_path / "leftImg8bit/val/12", tmp_path / "gtFine/val/12"
    image_dir.mkdir(parents=True), label_dir.mkdir(parents=True)
    Image.fromarray(np.stack([grey] * 3, -1)).save(image_dir / "7_image.jpg", quality=100)
    Image.fromarray(label).save(label_dir / "7_label.png")

    datasets = open_eval_datasets([DatasetSpec.from_string(f"idd={tmp_path}:idd_lite:val")])
    record = evaluate_datasets(GreyOracle(list(model_classes)), datasets, EvalConfig())
    assert record["targets"]["idd"]["iou"] == [100.0] * 7


def test_unmappable_target_classes_are_named_on_one_line():
    with pytest.raises(ConfigError) as err:
        TaxonomyBridge(list(CAMVID_CLASSES), 11, ["crop", "weed"], "farm")
    assert "crop, weed" in str(err.value) and "\n" not in str(err.value)
    # An IDD-trained model on Cityscapes: only sky matches by name; the rest are named.
    with pytest.raises(ConfigError, match="maps to road, sidewalk, building") as err:
        convert_logits(torch.zeros(1, 7, 1, 1), IDD, CS)
    assert "\n" not in str(err.value)


def test_the_shared_idd_lite_val_split():
    root = require_shared("data", "idd_lite")
    report = scan_dataset(root, "idd_lite", progress=False)
    assert report.ok, report.problems[:3]
    assert report.num_pairs == 204 and report.classes == IDD
    assert (report.pixel_counts > 0).all()  # all 7 classes occur
    ds = build_dataset(root, "idd_lite", split="val")
    assert len({s.domain for s in ds.samples}) == 61
    assert all(s.domain == s.image.parent.name == s.label.parent.name for s in ds.samples)
    assert ds[0]["label"].shape == (227, 320)
