"""Class lists, palettes and raw-id tables of each dataset, and conversions between taxonomies.

Every dataset reader maps its raw label ids to *training ids* ``0..K-1`` with 255 = ignore. The
tables here say how: Cityscapes' official labelId->trainId table (also used by GTA5), the
standard SYNTHIA->Cityscapes table, Mapillary Vistas' class lists with the name rules of Rein's
``mapillary2cityscape.py`` (itself from openseg.pytorch), and the small remote-sensing tables.

Across taxonomies (a model trained on Cityscapes' 19 classes scored on CamVid's 11 or the other
way round; a CamVid or Cityscapes model scored on IDD's 7 level-1 classes), :func:`class_mapping`
says which class of one list corresponds to which of the other; :func:`convert_label` and
:func:`convert_logits` apply it. See docs/datasets.md.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pivotseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = 255

Color = tuple[int, int, int]

# --- Cityscapes (19 trainIds), shared by GTA5, SYNTHIA, BDD100K, ACDC, Mapillary, CarlaScapes ---

CITYSCAPES_CLASSES: list[str] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
CITYSCAPES_PALETTE: list[Color] = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]

# Official cityscapesScripts labels.py: labelId -> trainId for the 19 evaluated classes; the other
# labelIds 0..33 (unlabeled, ego vehicle, parking, rail track, guard rail, bridge, tunnel,
# polegroup, caravan, trailer, ...) are ignored.
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
CITYSCAPES_NUM_LABELIDS = 34  # labelIds 0..33 are defined; 255 (and -1 as uint8) also ignore

# SYNTHIA-RAND-CITYSCAPES class ids (first channel of GT/LABELS): 0 void, 1 sky, 2 building,
# 3 road, 4 sidewalk, 5 fence, 6 vegetation, 7 pole, 8 car, 9 traffic sign, 10 pedestrian,
# 11 bicycle, 12 motorcycle, 13 parking-slot, 14 road-work, 15 traffic light, 16 terrain,
# 17 rider, 18 truck, 19 bus, 20 train, 21 wall, 22 lanemarking. The standard protocol keeps
# the 16 classes below (terrain, truck and train are left out and ignored).
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    19: 15,
    12: 17,
    11: 18,
}
SYNTHIA_NUM_IDS = 23
SYNTHIA_16_CLASSES = [CITYSCAPES_CLASSES[t] for t in sorted(SYNTHIA_ID_TO_TRAINID.values())]

# --- CamVid (SegNet's 11-class version; raw 11 = void) ---

CAMVID_CLASSES: list[str] = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
CAMVID_PALETTE: list[Color] = [
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
]

# --- Remote sensing ---

LOVEDA_CLASSES = ["background", "building", "road", "water", "barren", "forest", "agricultural"]
LOVEDA_PALETTE: list[Color] = [
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
]
# ISPRS Potsdam / Vaihingen after mmsegmentation's converter (noBoundary labels): 0 = eroded
# boundary (ignored), 1..6 = the six classes below, clutter = 6.
ISPRS_CLASSES = ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
ISPRS_PALETTE: list[Color] = [
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
]

# --- Mapillary Vistas (class names = the "readable" names of config_v1.2/v2.0.json) ---

MAPILLARY_V12_CLASSES: list[str] = [
    "Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane",
    "Crosswalk - Plain", "Curb Cut", "Parking", "Pedestrian Area", "Rail Track", "Road",
    "Service Lane", "Sidewalk", "Bridge", "Building", "Tunnel", "Person", "Bicyclist",
    "Motorcyclist", "Other Rider", "Lane Marking - Crosswalk", "Lane Marking - General",
    "Mountain", "Sand", "Sky", "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench",
    "Bike Rack", "Billboard", "Catch Basin", "CCTV Camera", "Fire Hydrant", "Junction Box",
    "Mailbox", "Manhole", "Phone Booth", "Pothole", "Street Light", "Pole", "Traffic Sign Frame",
    "Utility Pole", "Traffic Light", "Traffic Sign (Back)", "Traffic Sign (Front)", "Trash Can",
    "Bicycle", "Boat", "Bus", "Car", "Caravan", "Motorcycle", "On Rails", "Other Vehicle",
    "Trailer", "Truck", "Wheeled Slow", "Car Mount", "Ego Vehicle", "Unlabeled",
]  # fmt: skip
MAPILLARY_V12_PALETTE: list[Color] = [
    (165, 42, 42), (0, 192, 0), (196, 196, 196), (190, 153, 153), (180, 165, 180),
    (90, 120, 150), (102, 102, 156), (128, 64, 255), (140, 140, 200), (170, 170, 170),
    (250, 170, 160), (96, 96, 96), (230, 150, 140), (128, 64, 128), (110, 110, 110),
    (244, 35, 232), (150, 100, 100), (70, 70, 70), (150, 120, 90), (220, 20, 60), (255, 0, 0),
    (255, 0, 100), (255, 0, 200), (200, 128, 128), (255, 255, 255), (64, 170, 64),
    (230, 160, 50), (70, 130, 180), (190, 255, 255), (152, 251, 152), (107, 142, 35),
    (0, 170, 30), (255, 255, 128), (250, 0, 30), (100, 140, 180), (220, 220, 220),
    (220, 128, 128), (222, 40, 40), (100, 170, 30), (40, 40, 40), (33, 33, 33),
    (100, 128, 160), (142, 0, 0), (70, 100, 150), (210, 170, 100), (153, 153, 153),
    (128, 128, 128), (0, 0, 80), (250, 170, 30), (192, 192, 192), (220, 220, 0),
    (140, 140, 20), (119, 11, 32), (150, 0, 255), (0, 60, 100), (0, 0, 142), (0, 0, 90),
    (0, 0, 230), (0, 80, 100), (128, 64, 64), (0, 0, 110), (0, 0, 70), (0, 0, 192),
    (32, 32, 32), (120, 10, 10), (0, 0, 0),
]  # fmt: skip

MAPILLARY_V20_CLASSES: list[str] = [
    "Bird", "Ground Animal", "Ambiguous Barrier", "Concrete Block", "Curb", "Fence",
    "Guard Rail", "Barrier", "Road Median", "Road Side", "Lane Separator", "Temporary Barrier",
    "Wall", "Bike Lane", "Crosswalk - Plain", "Curb Cut", "Driveway", "Parking",
    "Parking Aisle", "Pedestrian Area", "Rail Track", "Road", "Road Shoulder", "Service Lane",
    "Sidewalk", "Traffic Island", "Bridge", "Building", "Garage", "Tunnel", "Person",
    "Person Group", "Bicyclist", "Motorcyclist", "Other Rider", "Lane Marking - Dashed Line",
    "Lane Marking - Straight Line", "Lane Marking - Zigzag Line", "Lane Marking - Ambiguous",
    "Lane Marking - Arrow (Left)", "Lane Marking - Arrow (Other)", "Lane Marking - Arrow (Right)",
    "Lane Marking - Arrow (Split Left or Straight)",
    "Lane Marking - Arrow (Split Right or Straight)", "Lane Marking - Arrow (Straight)",
    "Lane Marking - Crosswalk", "Lane Marking - Give Way (Row)",
    "Lane Marking - Give Way (Single)", "Lane Marking - Hatched (Chevron)",
    "Lane Marking - Hatched (Diagonal)", "Lane Marking - Other", "Lane Marking - Stop Line",
    "Lane Marking - Symbol (Bicycle)", "Lane Marking - Symbol (Other)", "Lane Marking - Text",
    "Lane Marking (only) - Dashed Line", "Lane Marking (only) - Crosswalk",
    "Lane Marking (only) - Other", "Lane Marking (only) - Test", "Mountain", "Sand", "Sky",
    "Snow", "Terrain", "Vegetation", "Water", "Banner", "Bench", "Bike Rack", "Catch Basin",
    "CCTV Camera", "Fire Hydrant", "Junction Box", "Mailbox", "Manhole", "Parking Meter",
    "Phone Booth", "Pothole", "Signage - Advertisement", "Signage - Ambiguous", "Signage - Back",
    "Signage - Information", "Signage - Other", "Signage - Store", "Street Light", "Pole",
    "Pole Group", "Traffic Sign Frame", "Utility Pole", "Traffic Cone",
    "Traffic Light - General (Single)", "Traffic Light - Pedestrians",
    "Traffic Light - General (Upright)", "Traffic Light - General (Horizontal)",
    "Traffic Light - Cyclists", "Traffic Light - Other", "Traffic Sign - Ambiguous",
    "Traffic Sign (Back)", "Traffic Sign - Direction (Back)", "Traffic Sign - Direction (Front)",
    "Traffic Sign (Front)", "Traffic Sign - Parking", "Traffic Sign - Temporary (Back)",
    "Traffic Sign - Temporary (Front)", "Trash Can", "Bicycle", "Boat", "Bus", "Car", "Caravan",
    "Motorcycle", "On Rails", "Other Vehicle", "Trailer", "Truck", "Vehicle Group",
    "Wheeled Slow", "Water Valve", "Car Mount", "Dynamic", "Ego Vehicle", "Ground", "Static",
    "Unlabeled",
]  # fmt: skip
MAPILLARY_V20_PALETTE: list[Color] = [
    (165, 42, 42), (0, 192, 0), (250, 170, 31), (250, 170, 32), (196, 196, 196),
    (190, 153, 153), (180, 165, 180), (90, 120, 150), (250, 170, 33), (250, 170, 34),
    (128, 128, 128), (250, 170, 35), (102, 102, 156), (128, 64, 255), (140, 140, 200),
    (170, 170, 170), (250, 170, 36), (250, 170, 160), (250, 170, 37), (96, 96, 96),
    (230, 150, 140), (128, 64, 128), (110, 110, 110), (110, 110, 110), (244, 35, 232),
    (128, 196, 128), (150, 100, 100), (70, 70, 70), (150, 150, 150), (150, 120, 90),
    (220, 20, 60), (220, 20, 60), (255, 0, 0), (255, 0, 100), (255, 0, 200), (255, 255, 255),
    (255, 255, 255), (250, 170, 29), (250, 170, 28), (250, 170, 26), (250, 170, 25),
    (250, 170, 24), (250, 170, 22), (250, 170, 21), (250, 170, 20), (255, 255, 255),
    (250, 170, 19), (250, 170, 18), (250, 170, 12), (250, 170, 11), (255, 255, 255),
    (255, 255, 255), (250, 170, 16), (250, 170, 15), (250, 170, 15), (255, 255, 255),
    (255, 255, 255), (255, 255, 255), (255, 255, 255), (64, 170, 64), (230, 160, 50),
    (70, 130, 180), (190, 255, 255), (152, 251, 152), (107, 142, 35), (0, 170, 30),
    (255, 255, 128), (250, 0, 30), (100, 140, 180), (220, 128, 128), (222, 40, 40),
    (100, 170, 30), (40, 40, 40), (33, 33, 33), (100, 128, 160), (20, 20, 255), (142, 0, 0),
    (70, 100, 150), (250, 171, 30), (250, 172, 30), (250, 173, 30), (250, 174, 30),
    (250, 175, 30), (250, 176, 30), (210, 170, 100), (153, 153, 153), (153, 153, 153),
    (128, 128, 128), (0, 0, 80), (210, 60, 60), (250, 170, 30), (250, 170, 30), (250, 170, 30),
    (250, 170, 30), (250, 170, 30), (250, 170, 30), (192, 192, 192), (192, 192, 192),
    (192, 192, 192), (220, 220, 0), (220, 220, 0), (0, 0, 196), (192, 192, 192), (220, 220, 0),
    (140, 140, 20), (119, 11, 32), (150, 0, 255), (0, 60, 100), (0, 0, 142), (0, 0, 90),
    (0, 0, 230), (0, 80, 100), (128, 64, 64), (0, 0, 110), (0, 0, 70), (0, 0, 142),
    (0, 0, 192), (170, 170, 170), (32, 32, 32), (111, 74, 0), (120, 10, 10), (81, 0, 81),
    (111, 111, 0), (0, 0, 0),
]  # fmt: skip

# Mapillary v2.0 names that Rein's name rules get wrong, corrected here (docs/datasets.md):
# its exact-name rule never matches the v2.0 traffic-light names, and "parking" would turn
# parking meters into road.
_MAPILLARY_V20_CORRECTIONS = {
    "trafficlightgeneral(single)": "traffic light",
    "trafficlightpedestrians": "traffic light",
    "trafficlightgeneral(upright)": "traffic light",
    "trafficlightgeneral(horizontal)": "traffic light",
    "trafficlightcyclists": "traffic light",
    "trafficlightother": "traffic light",
    "parkingmeter": None,
}


def _squash(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "").replace("_", "")


def mapillary_to_cityscapes(mapillary_classes: Sequence[str], corrections: bool = False) -> dict:
    """Mapillary class index -> Cityscapes trainId by Rein's ``mapillary2cityscape.py`` rules.

    The rules (applied in this order to the lower-cased name without spaces and hyphens): an
    exact Cityscapes name; contains "trafficsign", "front" or "back" -> traffic sign; "onrail"
    -> train; "cyclist" or "rider" -> rider; "pole" or "streetlight" -> pole; "curb" or
    "pedestrianarea" -> sidewalk; "crosswalkplain", "parking", "bikelane", "servicelane" or
    "lanemarking" -> road; anything else is ignored (255).

    Args:
        mapillary_classes: the dataset's class names (v1.2: 66, v2.0: 124).
        corrections: apply :data:`_MAPILLARY_V20_CORRECTIONS` first (used for v2.0).

    Returns:
        ``{mapillary_index: trainId}`` with 255 for ignored classes.
    """
    by_name = {_squash(n): i for i, n in enumerate(CITYSCAPES_CLASSES)}
    rules = [
        (("trafficsign", "front", "back"), "traffic sign"),
        (("onrail",), "train"),
        (("cyclist", "rider"), "rider"),
        (("pole", "streetlight"), "pole"),
        (("curb", "pedestrianarea"), "sidewalk"),
        (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
    ]
    table = {}
    for index, name in enumerate(mapillary_classes):
        key = _squash(name)
        target: str | None = None
        if corrections and key in _MAPILLARY_V20_CORRECTIONS:
            target = _MAPILLARY_V20_CORRECTIONS[key]
        elif key in by_name:
            target = CITYSCAPES_CLASSES[by_name[key]]
        else:
            target = next((t for words, t in rules if any(w in key for w in words)), None)
        table[index] = IGNORE_INDEX if target is None else CITYSCAPES_CLASSES.index(target)
    return table


MAPILLARY_V12_TO_TRAINID = mapillary_to_cityscapes(MAPILLARY_V12_CLASSES)
MAPILLARY_V20_TO_TRAINID = mapillary_to_cityscapes(MAPILLARY_V20_CLASSES, corrections=True)

# --- IDD (India Driving Dataset): the 7 level-1 classes of IDD Lite ---

IDD_LEVEL1_CLASSES: list[str] = [
    "drivable",
    "non-drivable",
    "living things",
    "vehicles",
    "road-side objects",
    "far objects",
    "sky",
]
# The Cityscapes colour of each group's main class (road, sidewalk, person, car, traffic sign,
# building, sky): IDD Lite ships no palette of its own.
IDD_LEVEL1_PALETTE: list[Color] = [
    (128, 64, 128),
    (244, 35, 232),
    (220, 20, 60),
    (0, 0, 142),
    (220, 220, 0),
    (70, 70, 70),
    (70, 130, 180),
]

# --- Across taxonomies ---

# CamVid class -> Cityscapes classes it covers. The first name is where a CamVid *label* goes
# when converted to Cityscapes ids; every listed Cityscapes class is merged into the CamVid class
# when Cityscapes *predictions* are scored on CamVid. The groups follow SegNet's grouping of
# CamVid's 32 classes into 11: Building holds Wall (and Bridge, Tunnel, Archway), SignSymbol
# holds TrafficLight, Car holds SUVPickupTruck, Truck_Bus, Train and OtherMoving, Bicyclist holds
# MotorcycleScooter (rider and two-wheeler as one region; the rider's body covers most of its
# pixels, so rider is the label target). Cityscapes terrain (grass, soil) has no single CamVid
# class (low vegetation is Tree via VegetationMisc, bare ground is not), so it stays unmapped.
CAMVID_TO_CITYSCAPES: dict[str, list[str]] = {
    "Sky": ["sky"],
    "Building": ["building", "wall"],
    "Pole": ["pole"],
    "Road": ["road"],
    "Pavement": ["sidewalk"],
    "Tree": ["vegetation"],
    "SignSymbol": ["traffic sign", "traffic light"],
    "Fence": ["fence"],
    "Car": ["car", "truck", "bus", "train"],
    "Pedestrian": ["person"],
    "Bicyclist": ["rider", "bicycle", "motorcycle"],
}

# IDD level-1 class -> the Cityscapes classes merged into it, from IDD's own label helper
# (anue_labels.py, the csTrainId and level1Id columns).
IDD_LEVEL1_FROM_CITYSCAPES: dict[str, list[str]] = {
    "drivable": ["road"],
    "non-drivable": ["sidewalk", "terrain"],
    "living things": ["person", "rider"],
    "vehicles": ["car", "truck", "bus", "train", "motorcycle", "bicycle"],
    "road-side objects": ["wall", "fence", "pole", "traffic light", "traffic sign"],
    "far objects": ["building", "vegetation"],
    "sky": ["sky"],
}

# IDD level-1 class -> the CamVid classes merged into it: each CamVid class goes where its main
# Cityscapes class (the label target above) goes in IDD's table. Building -> far objects although
# CamVid's Building also holds walls (road-side objects in IDD): buildings are most of its pixels.
# Bicyclist -> living things, as the rider (Cityscapes' rider is living things, the bicycle or
# motorcycle under it vehicles).
IDD_LEVEL1_FROM_CAMVID: dict[str, list[str]] = {
    "drivable": ["Road"],
    "non-drivable": ["Pavement"],
    "living things": ["Pedestrian", "Bicyclist"],
    "vehicles": ["Car"],
    "road-side objects": ["Pole", "SignSymbol", "Fence"],
    "far objects": ["Building", "Tree"],
    "sky": ["Sky"],
}


def _merged(source: list[str], target: list[str], table: dict[str, list[str]]) -> dict[int, int]:
    """``{source index: target index}`` from ``{target class: [source classes merged into it]}``."""
    return {source.index(s): target.index(t) for t, names in table.items() for s in names}


_CAMVID_TO_CS = {
    CAMVID_CLASSES.index(c): CITYSCAPES_CLASSES.index(names[0])
    for c, names in CAMVID_TO_CITYSCAPES.items()
}
_CS_TO_CAMVID = _merged(CITYSCAPES_CLASSES, CAMVID_CLASSES, CAMVID_TO_CITYSCAPES)
# (source classes, target classes) -> {source index: target index}, for the known links.
TAXONOMY_LINKS: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[int, int]] = {
    (tuple(CAMVID_CLASSES), tuple(CITYSCAPES_CLASSES)): _CAMVID_TO_CS,
    (tuple(CITYSCAPES_CLASSES), tuple(CAMVID_CLASSES)): _CS_TO_CAMVID,
    (tuple(CITYSCAPES_CLASSES), tuple(IDD_LEVEL1_CLASSES)): _merged(
        CITYSCAPES_CLASSES, IDD_LEVEL1_CLASSES, IDD_LEVEL1_FROM_CITYSCAPES
    ),
    (tuple(CAMVID_CLASSES), tuple(IDD_LEVEL1_CLASSES)): _merged(
        CAMVID_CLASSES, IDD_LEVEL1_CLASSES, IDD_LEVEL1_FROM_CAMVID
    ),
}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def class_mapping(source_classes: Sequence[str], target_classes: Sequence[str]) -> dict:
    """Which target class each source class corresponds to.

    Identical lists map one to one; the known links of :data:`TAXONOMY_LINKS` (CamVid <->
    Cityscapes, CamVid and Cityscapes -> IDD level 1) use their tables; otherwise classes are matched by name (case, spaces,
    underscores and hyphens ignored).

    Returns:
        ``{source_index: target_index or None}`` for every source class; each source class maps
        to at most one target class (several source classes may share a target).
    """
    source, target = tuple(source_classes), tuple(target_classes)
    if source == target:
        return {i: i for i in range(len(source))}
    link = TAXONOMY_LINKS.get((source, target))
    if link is not None:
        return {i: link.get(i) for i in range(len(source))}
    by_name = {_normalise(n): i for i, n in enumerate(target)}
    return {i: by_name.get(_normalise(n)) for i, n in enumerate(source)}


def unmapped_classes(source_classes: Sequence[str], target_classes: Sequence[str]) -> list[str]:
    """Target classes that no source class maps to (a source model can never predict them)."""
    hit = {t for t in class_mapping(source_classes, target_classes).values() if t is not None}
    return [name for i, name in enumerate(target_classes) if i not in hit]


def label_lookup(source_classes: Sequence[str], target_classes: Sequence[str]) -> np.ndarray:
    """A 256-entry table taking source training ids to target ids (unmapped and 255 -> 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for s, t in class_mapping(source_classes, target_classes).items():
        if t is not None:
            lut[s] = t
    return lut


def _is_tensor(value) -> bool:
    # Without torch imported there can be no tensor: data check stays on NumPy alone.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def convert_label(label, source_classes: Sequence[str], target_classes: Sequence[str]):
    """Re-express a label map (numpy or torch, ids ``0..K-1`` / 255) in another taxonomy.

    Pixels of source classes without a target counterpart become 255.
    """
    lut = label_lookup(source_classes, target_classes)
    if _is_tensor(label):
        import torch

        return torch.as_tensor(lut, device=label.device)[label.long()]
    return lut[np.asarray(label, dtype=np.int64)]


def ignore_unmapped(label, source_classes: Sequence[str], target_classes: Sequence[str]):
    """Set label pixels (in the *target* taxonomy) of classes no source class reaches to 255.

    Used when scoring a model of ``source_classes`` on data labelled in ``target_classes``: the
    model cannot predict those classes, so their pixels are left out of the evaluation and the
    classes get NaN IoU (excluded from the mean).
    """
    missing = [target_classes.index(n) for n in unmapped_classes(source_classes, target_classes)]
    if _is_tensor(label):
        import torch

        out = label.clone()
        out[torch.isin(out, torch.tensor(missing, device=label.device, dtype=out.dtype))] = 255
        return out
    out = np.array(label, copy=True)
    out[np.isin(out, missing)] = IGNORE_INDEX
    return out


def convert_logits(
    logits: torch.Tensor,
    source_classes: Sequence[str],
    target_classes: Sequence[str],
    required: Sequence[str] | None = None,
) -> torch.Tensor:
    """Turn per-pixel scores of the source taxonomy into scores of the target taxonomy.

    A target class gathers the source classes mapped to it by log-sum-exp, so its softmax
    probability is the sum of theirs; target classes that no source class reaches get ``-inf``
    (never predicted); source classes without a target drop out.

    Args:
        logits: ``(B, K_source, H, W)`` class scores.
        source_classes: the model's classes.
        target_classes: the dataset's classes.
        required: target classes that must be reachable (default: all of them); pass the
            reachable subset (``target - unmapped_classes(...)``) to score on it, together with
            :func:`ignore_unmapped` on the labels.

    Raises:
        ConfigError: naming the required target classes that no source class maps to.
    """
    if logits.shape[1] != len(source_classes):
        raise ConfigError(
            f"logits have {logits.shape[1]} channels but {len(source_classes)} source classes "
            "were given; pass the model's class list"
        )
    missing = unmapped_classes(source_classes, target_classes)
    needed = list(target_classes) if required is None else list(required)
    refused = [name for name in needed if name in missing]
    if refused:
        raise ConfigError(
            f"no class of the model maps to {', '.join(refused)}; score on the mapped classes "
            "only (required=..., ignore_unmapped on the labels) or add a mapping"
        )
    import torch

    mapping = class_mapping(source_classes, target_classes)
    b, _, h, w = logits.shape
    out = logits.new_full((b, len(target_classes), h, w), float("-inf"))
    for t in range(len(target_classes)):
        sources = [s for s, tt in mapping.items() if tt == t]
        if sources:
            out[:, t] = torch.logsumexp(logits[:, sources], dim=1)
    return out
