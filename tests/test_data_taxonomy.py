"""Class tables and conversions between taxonomies (CamVid <-> Cityscapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotseg.data.taxonomy import (
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    MAPILLARY_V12_CLASSES,
    MAPILLARY_V12_TO_TRAINID,
    MAPILLARY_V20_CLASSES,
    MAPILLARY_V20_TO_TRAINID,
    SYNTHIA_16_CLASSES,
    class_mapping,
    convert_label,
    convert_logits,
    ignore_unmapped,
    unmapped_classes,
)
from pivotseg.errors import ConfigError

CS = CITYSCAPES_CLASSES


def test_camvid_to_cityscapes_label_table():
    camvid_label = np.array([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 255]])
    out = convert_label(camvid_label, CAMVID_CLASSES, CS)
    # Sky, Building, Pole, Road, Pavement, Tree / SignSymbol, Fence, Car, Pedestrian, Bicyclist
    expected = [
        [CS.index(n) for n in ("sky", "building", "pole", "road", "sidewalk", "vegetation")],
        [CS.index(n) for n in ("traffic sign", "fence", "car", "person", "rider")] + [255],
    ]
    np.testing.assert_array_equal(out, expected)
    torch.testing.assert_close(
        convert_label(torch.tensor(camvid_label), CAMVID_CLASSES, CS), torch.tensor(expected)
    )


def test_cityscapes_to_camvid_follows_the_segnet_grouping():
    mapping = class_mapping(CS, CAMVID_CLASSES)
    name = {CS[i]: (CAMVID_CLASSES[t] if t is not None else None) for i, t in mapping.items()}
    # SegNet's 32 -> 11 grouping of CamVid, written out by hand: Building holds Wall, Car holds
    # SUVPickupTruck, Truck_Bus, Train and OtherMoving, Bicyclist holds MotorcycleScooter,
    # SignSymbol holds TrafficLight. Only terrain (grass or soil) has no single counterpart.
    assert name == {
        "road": "Road", "sidewalk": "Pavement", "building": "Building", "wall": "Building",
        "fence": "Fence", "pole": "Pole", "traffic light": "SignSymbol",
        "traffic sign": "SignSymbol", "vegetation": "Tree", "terrain": None, "sky": "Sky",
        "person": "Pedestrian", "rider": "Bicyclist", "car": "Car", "truck": "Car",
        "bus": "Car", "train": "Car", "motorcycle": "Bicyclist", "bicycle": "Bicyclist",
    }  # fmt: skip
    assert unmapped_classes(CS, CAMVID_CLASSES) == []
    assert unmapped_classes(CAMVID_CLASSES, CS) == [
        "wall", "traffic light", "terrain", "truck", "bus", "train", "motorcycle", "bicycle",
    ]  # fmt: skip


def test_convert_logits_sums_probabilities_of_merged_classes():
    logits = torch.randn(2, 19, 3, 4)
    out = convert_logits(logits, CS, CAMVID_CLASSES)
    assert out.shape == (2, 11, 3, 4)
    mapped = [i for i, t in class_mapping(CS, CAMVID_CLASSES).items() if t is not None]
    source_probs = torch.softmax(logits[:, mapped], 1)
    target_probs = torch.softmax(out, 1)
    sign = CAMVID_CLASSES.index("SignSymbol")
    expected = (
        source_probs[:, mapped.index(CS.index("traffic sign"))]
        + source_probs[:, mapped.index(CS.index("traffic light"))]
    )
    torch.testing.assert_close(target_probs[:, sign], expected)
    torch.testing.assert_close(out[:, CAMVID_CLASSES.index("Sky")], logits[:, CS.index("sky")])


def test_a_cityscapes_bus_is_scored_as_camvid_car():
    # CamVid's own labels mark buses as Car (0016E5_04410: a double-decker). Bus is the argmax,
    # building second, car third: without the merge the bus pixel would come out as Building.
    logits = torch.full((1, 19, 1, 1), -5.0)
    logits[0, CS.index("bus"), 0, 0] = 4.0
    logits[0, CS.index("building"), 0, 0] = 3.0
    logits[0, CS.index("car"), 0, 0] = 1.0
    out = convert_logits(logits, CS, CAMVID_CLASSES)
    assert CAMVID_CLASSES[int(out.argmax(1))] == "Car"
    expected = torch.logsumexp(
        logits[0, [CS.index(c) for c in ("car", "truck", "bus", "train")]], 0
    )
    torch.testing.assert_close(out[:, CAMVID_CLASSES.index("Car")], expected[None])
    # A motorcyclist (motorcycle argmax, person second) is CamVid's Bicyclist, not Pedestrian.
    logits = torch.full((1, 19, 1, 1), -5.0)
    logits[0, CS.index("motorcycle"), 0, 0] = 2.0
    logits[0, CS.index("person"), 0, 0] = 1.5
    logits[0, CS.index("rider"), 0, 0] = 1.0
    assert CAMVID_CLASSES[int(convert_logits(logits, CS, CAMVID_CLASSES).argmax(1))] == "Bicyclist"


def test_convert_logits_refuses_unreachable_required_classes():
    logits = torch.randn(1, 11, 2, 2)
    with pytest.raises(ConfigError, match="wall, traffic light, terrain"):
        convert_logits(logits, CAMVID_CLASSES, CS)
    reachable = [c for c in CS if c not in unmapped_classes(CAMVID_CLASSES, CS)]
    out = convert_logits(logits, CAMVID_CLASSES, CS, required=reachable)
    assert torch.isinf(out[:, CS.index("wall")]).all()
    torch.testing.assert_close(
        out[:, CS.index("rider")], logits[:, CAMVID_CLASSES.index("Bicyclist")]
    )
    with pytest.raises(ConfigError, match="channels"):
        convert_logits(torch.randn(1, 5, 2, 2), CAMVID_CLASSES, CS)


def test_ignore_unmapped_label_pixels():
    label = np.array([CS.index("wall"), CS.index("road"), CS.index("bicycle"), 255])
    np.testing.assert_array_equal(
        ignore_unmapped(label, CAMVID_CLASSES, CS), [255, CS.index("road"), 255, 255]
    )
    out = ignore_unmapped(torch.tensor(label), CAMVID_CLASSES, CS)
    assert out.tolist() == [255, CS.index("road"), 255, 255]


def test_identity_and_name_matching():
    assert class_mapping(CS, CS) == {i: i for i in range(19)}
    assert class_mapping(["Road", "Traffic_Sign", "cow"], ["traffic sign", "road"]) == {
        0: 1,
        1: 0,
        2: None,
    }


def test_mapillary_rules_spot_checks():
    v12 = {MAPILLARY_V12_CLASSES[i]: t for i, t in MAPILLARY_V12_TO_TRAINID.items()}
    expected = {
        "Road": 0, "Lane Marking - General": 0, "Bike Lane": 0, "Service Lane": 0,
        "Curb": 1, "Curb Cut": 1, "Pedestrian Area": 1, "Building": 2, "Wall": 3,
        "Street Light": 5, "Utility Pole": 5, "Traffic Light": 6, "Traffic Sign Frame": 7,
        "Traffic Sign (Back)": 7, "Bicyclist": 12, "Motorcyclist": 12, "On Rails": 16,
        "Manhole": 255, "Guard Rail": 255, "Caravan": 255, "Unlabeled": 255, "Water": 255,
    }  # fmt: skip
    assert {k: v12[k] for k in expected} == expected
    # 7 road, 4 sidewalk, 3 pole, 3 traffic sign, 3 rider, one each for the other 14 classes
    assert sum(t != 255 for t in MAPILLARY_V12_TO_TRAINID.values()) == 34
    v20 = {MAPILLARY_V20_CLASSES[i]: t for i, t in MAPILLARY_V20_TO_TRAINID.items()}
    assert v20["Traffic Light - Pedestrians"] == 6 and v20["Parking Meter"] == 255
    assert v20["Lane Marking (only) - Crosswalk"] == 0 and v20["Person Group"] == 255
    assert set(MAPILLARY_V20_TO_TRAINID.values()) == set(range(19)) | {255}


def test_synthia_has_16_classes():
    assert len(SYNTHIA_16_CLASSES) == 16
    assert {"terrain", "truck", "train"}.isdisjoint(SYNTHIA_16_CLASSES)
