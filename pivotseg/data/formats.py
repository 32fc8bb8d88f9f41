"""Readers for each dataset's own on-disk layout, and :func:`build_dataset`.

:data:`FORMATS` maps a format name to its reader class. A reader knows the layout (where images
and labels live and how their names pair up), the split folders, and how raw label ids become
training ids. ``build_dataset(path, format, split)`` finds the pairs and returns a
:class:`~pivotseg.data.dataset.SegDataset`; docs/datasets.md lists every layout.

``split=None`` reads every split the folder holds (a layout without split folders has a single
unnamed one); pass ``split`` to read one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pivotseg.data.io import IMAGE_EXTENSIONS, list_files, read_label
from pivotseg.data.listing import LabelDecoder, Listing, Sample
from pivotseg.data.taxonomy import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_NUM_LABELIDS,
    CITYSCAPES_PALETTE,
    IDD_LEVEL1_CLASSES,
    IDD_LEVEL1_PALETTE,
    IGNORE_INDEX,
    ISPRS_CLASSES,
    ISPRS_PALETTE,
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    MAPILLARY_V12_CLASSES,
    MAPILLARY_V12_PALETTE,
    MAPILLARY_V12_TO_TRAINID,
    MAPILLARY_V20_CLASSES,
    MAPILLARY_V20_PALETTE,
    MAPILLARY_V20_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID,
    SYNTHIA_NUM_IDS,
    Color,
)
from pivotseg.errors import ConfigError, DataError
from pivotseg.naming import check_kwargs, closest

if TYPE_CHECKING:
    from pivotseg.data.dataset import SegDataset

KeyFn = Callable[[Path, Path], tuple[str, str] | None]


def _suffix_key(suffix: str) -> KeyFn:
    """Pair key: (folder relative to the root, file name without ``suffix``); None if no match."""

    def key(path: Path, root: Path) -> tuple[str, str] | None:
        if not path.name.endswith(suffix):
            return None
        return str(path.parent.relative_to(root)), path.name[: -len(suffix)]

    return key


def _stem_key(extensions: Sequence[str]) -> KeyFn:
    lowered = tuple(e.lower() for e in extensions)

    def key(path: Path, root: Path) -> tuple[str, str] | None:
        if path.suffix.lower() not in lowered:
            return None
        return str(path.parent.relative_to(root)), path.stem

    return key


def pair_files(
    image_root: Path,
    label_root: Path,
    image_key: KeyFn,
    label_key: KeyFn,
    recursive: bool = False,
    split: str | None = None,
    domain: str | None = None,
) -> Listing:
    """Match image and label files of two folders by their keys (see :func:`_suffix_key`)."""
    pattern = "**/*" if recursive else "*"
    images, labels = {}, {}
    for folder, keyfn, found in ((image_root, image_key, images), (label_root, label_key, labels)):
        if folder.is_dir():
            for path in sorted(folder.glob(pattern)):
                key = keyfn(path, folder) if path.is_file() else None
                if key is not None:
                    found[key] = path
    listing = Listing()
    for key, image in images.items():
        label = labels.get(key)
        if label is None:
            listing.unpaired_images.append(image)
        else:
            listing.pairs.append(Sample(image, label, split, domain))
    listing.unpaired_labels = [p for k, p in labels.items() if k not in images]
    return listing


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _has_images(folder: Path) -> bool:
    return bool(list_files(folder, IMAGE_EXTENSIONS))


def _identity_table(num_classes: int) -> dict[int, int]:
    return {i: i for i in range(num_classes)}


class DatasetFormat:
    """A dataset layout. Subclasses set the class attributes and :meth:`find`.

    Attributes:
        name: the format name (key of :data:`FORMATS`).
        layout: the expected layout in one line, quoted by errors.
        classes, palette: the training classes and their colours.
    """

    name: str = ""
    layout: str = ""
    classes: list[str] = CITYSCAPES_CLASSES
    palette: list[Color] = CITYSCAPES_PALETTE

    def __init__(self) -> None:
        self.decoder = self.make_decoder()

    def make_decoder(self) -> LabelDecoder:
        return LabelDecoder(
            _identity_table(len(self.classes)), f"{self.name} ids 0-{len(self.classes) - 1}"
        )

    def prepare(self, root: Path) -> None:
        """Read what the reader needs from the dataset folder (the folder format's classes)."""

    # -- layout --
    def splits(self, root: Path) -> list[str]:
        """Split names found under ``root``; ``[]`` when the layout has no split folders."""
        return []

    def find(self, root: Path, split: str | None) -> Listing:
        """Pairs of one split (``None`` for a layout without splits)."""
        raise NotImplementedError

    # -- labels --
    def read_label(self, path: Path) -> np.ndarray:
        """Training ids ``int64 (H, W)`` of a label file."""
        return self.decode(read_label(path), path)

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw ids (as read by :func:`~pivotseg.data.io.read_label`) -> training ids."""
        return self.decoder(raw, path)

    def default_domain(self, split: str | None) -> str:
        return self.name

    def scan(self, root: Path, split: str | None = None) -> Listing:
        """Every pair of ``split`` (or of all splits when ``None``), unpaired files included."""
        splits = self.splits(root)
        if split is None:
            chosen: list[str | None] = list(splits) if splits else [None]
        elif splits and split not in splits and self.normalise_split(split) not in splits:
            raise DataError(
                f"{root}: no split {split!r} in this {self.name} folder; found: "
                f"{', '.join(splits)} (or leave the split out to read all)"
            )
        elif not splits:
            raise DataError(
                f"{root}: this {self.name} folder has no split folders ({self.layout}); "
                "leave the split out"
            )
        else:
            chosen = [self.normalise_split(split) if split not in splits else split]
        listing = Listing()
        for name in chosen:
            listing.extend(self.find(root, name))
        return listing

    def normalise_split(self, split: str) -> str:
        return split


class _TwoFolderFormat(DatasetFormat):
    """``<images>/[<split>/]`` + ``<labels>/[<split>/]``, paired by file stem."""

    image_dir = "images"
    label_dir = "labels"
    label_suffix = ".png"

    def splits(self, root: Path) -> list[str]:
        images = root / self.image_dir
        if _has_images(images):
            return []
        return [s for s in _subdirs(images) if (root / self.label_dir / s).is_dir()]

    def find(self, root: Path, split: str | None) -> Listing:
        sub = split or ""
        return pair_files(
            root / self.image_dir / sub,
            root / self.label_dir / sub,
            _stem_key(IMAGE_EXTENSIONS),
            _suffix_key(self.label_suffix),
            split=split,
        )


class CityscapesFormat(DatasetFormat):
    """Cityscapes: labelIds mapped by the official table, or ready-made labelTrainIds.

    Args:
        label_kind: ``"auto"`` (labelTrainIds when every image of the split has one, else
            labelIds), ``"labelIds"`` or ``"labelTrainIds"``.
    """

    name = "cityscapes"
    layout = (
        "leftImg8bit/<split>/<city>/*_leftImg8bit.png + "
        "gtFine/<split>/<city>/*_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)"
    )

    def __init__(self, label_kind: str = "auto"):
        if label_kind not in ("auto", "labelIds", "labelTrainIds"):
            raise ConfigError(
                f"cityscapes label_kind {label_kind!r}: use auto, labelIds or labelTrainIds"
            )
        self.label_kind = label_kind
        super().__init__()
        self.trainid_decoder = LabelDecoder(_identity_table(19), "Cityscapes trainIds 0-18")

    def make_decoder(self) -> LabelDecoder:
        table = {i: CITYSCAPES_LABELID_TO_TRAINID.get(i, IGNORE_INDEX) for i in range(34)}
        return LabelDecoder(table, f"Cityscapes labelIds 0-{CITYSCAPES_NUM_LABELIDS - 1}")

    def splits(self, root: Path) -> list[str]:
        return [s for s in _subdirs(root / "leftImg8bit") if (root / "gtFine" / s).is_dir()]

    def find(self, root: Path, split: str | None) -> Listing:
        kinds = ["labelTrainIds", "labelIds"] if self.label_kind == "auto" else [self.label_kind]
        listing = Listing()
        for kind in kinds:
            listing = pair_files(
                root / "leftImg8bit" / (split or ""),
                root / "gtFine" / (split or ""),
                _suffix_key("_leftImg8bit.png"),
                _suffix_key(f"_gtFine_{kind}.png"),
                recursive=True,
                split=split,
            )
            if listing.pairs and not listing.unpaired_images:
                break
        return listing

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        decoder = self.trainid_decoder if path.name.endswith("_labelTrainIds.png") else self.decoder
        return decoder(raw, path)


class GTA5Format(_TwoFolderFormat):
    """GTA5: ``images/*.png`` + ``labels/*.png`` holding Cityscapes labelIds."""

    name = "gta5"
    layout = "images/[<split>/]*.png + labels/[<split>/]*.png (Cityscapes labelIds)"

    def make_decoder(self) -> LabelDecoder:
        table = {i: CITYSCAPES_LABELID_TO_TRAINID.get(i, IGNORE_INDEX) for i in range(34)}
        return LabelDecoder(table, "Cityscapes labelIds 0-33")


class SynthiaFormat(DatasetFormat):
    """SYNTHIA-RAND-CITYSCAPES: 16-bit ``GT/LABELS`` whose first channel is the class id.

    The 16 classes shared with Cityscapes keep their trainIds; terrain, truck and train (SYNTHIA
    ids 16, 18, 20), void, parking-slot, road-work and lane-marking are ignored.
    """

    name = "synthia"
    layout = "RGB/*.png + GT/LABELS/*.png (16-bit, SYNTHIA ids in the first channel)"

    def make_decoder(self) -> LabelDecoder:
        table = {i: SYNTHIA_ID_TO_TRAINID.get(i, IGNORE_INDEX) for i in range(SYNTHIA_NUM_IDS)}
        return LabelDecoder(table, f"SYNTHIA ids 0-{SYNTHIA_NUM_IDS - 1}")

    def find(self, root: Path, split: str | None) -> Listing:
        return pair_files(
            root / "RGB", root / "GT" / "LABELS", _stem_key(IMAGE_EXTENSIONS), _suffix_key(".png")
        )

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.ndim == 3:  # the class id is the first (red) channel
            raw = raw[..., 0]
        return self.decoder(raw, path)


class BDD100KFormat(DatasetFormat):
    """BDD100K semantic segmentation (10k images) with trainId masks."""

    name = "bdd100k"
    layout = "images/10k/<split>/*.jpg + labels/sem_seg/masks/<split>/*.png (trainIds)"

    def splits(self, root: Path) -> list[str]:
        masks = root / "labels" / "sem_seg" / "masks"
        return [s for s in _subdirs(root / "images" / "10k") if (masks / s).is_dir()]

    def find(self, root: Path, split: str | None) -> Listing:
        return pair_files(
            root / "images" / "10k" / (split or ""),
            root / "labels" / "sem_seg" / "masks" / (split or ""),
            _stem_key(IMAGE_EXTENSIONS),
            _suffix_key(".png"),
            split=split,
        )


class ACDCFormat(DatasetFormat):
    """ACDC: per-condition folders; each sample's domain is its condition.

    ``split`` is ``"val"`` (every condition) or ``"<condition>/<split>"``; ``condition=`` does the
    same. The dataset's domain is the condition when a single one is read, else ``"acdc"``.
    """

    name = "acdc"
    layout = (
        "rgb_anon/<condition>/<split>/<seq>/*_rgb_anon.png + "
        "gt/<condition>/<split>/<seq>/*_gt_labelTrainIds.png (condition: fog, night, rain, snow)"
    )

    def __init__(self, condition: str | None = None):
        self.condition = condition
        super().__init__()

    def _conditions(self, root: Path) -> list[str]:
        found = _subdirs(root / "gt")
        if self.condition is not None:
            if self.condition not in found:
                raise DataError(
                    f"{root}: no ACDC condition {self.condition!r}; found: {', '.join(found)}"
                )
            return [self.condition]
        return found

    def splits(self, root: Path) -> list[str]:
        names = {s for c in self._conditions(root) for s in _subdirs(root / "gt" / c)}
        return sorted(names) + sorted(
            f"{c}/{s}" for c in self._conditions(root) for s in _subdirs(root / "gt" / c)
        )

    def find(self, root: Path, split: str | None) -> Listing:
        if split and "/" in split:
            conditions, split = [split.split("/")[0]], split.split("/")[1]
        else:
            conditions = self._conditions(root)
        listing = Listing()
        for cond in conditions:
            listing.extend(
                pair_files(
                    root / "rgb_anon" / cond / (split or ""),
                    root / "gt" / cond / (split or ""),
                    _suffix_key("_rgb_anon.png"),
                    _suffix_key("_gt_labelTrainIds.png"),
                    recursive=True,
                    split=split,
                    domain=cond,
                )
            )
        return listing

    def scan(self, root: Path, split: str | None = None) -> Listing:
        if split is None:
            names = [s for s in self.splits(root) if "/" not in s]
            listing = Listing()
            for name in names:
                listing.extend(self.find(root, name))
            return listing
        return super().scan(root, split)

    def default_domain(self, split: str | None) -> str:
        if self.condition:
            return self.condition
        if split and "/" in split:
            return split.split("/")[0]
        return self.name


class _MapillaryFormat(DatasetFormat):
    """Mapillary Vistas: palette-index (or colour) labels mapped to the 19 Cityscapes classes.

    Layouts: the official ``<split>/images/*.jpg`` + ``<split>/<version>/labels/*.png``
    (splits ``training``, ``validation``; ``train``/``val`` are accepted), or a flat
    ``images/`` + ``<version>/[labels/]``. Colour labels are decoded through the version's
    palette; in v2.0 a colour shared by classes that map to different Cityscapes classes
    becomes ignore.
    """

    version = ""
    source_classes: list[str] = []
    source_palette: list[Color] = []
    to_trainid: dict[int, int] = {}

    def __init__(self) -> None:
        self.layout = (
            f"<split>/images/*.jpg + <split>/{self.version}/labels/*.png, or images/*.jpg + "
            f"{self.version}/*.png"
        )
        super().__init__()

    def make_decoder(self) -> LabelDecoder:
        colours: dict[Color, set[int]] = {}
        for index, colour in enumerate(self.source_palette):
            colours.setdefault(tuple(colour), set()).add(self.to_trainid[index])
        colour_table = {c: (t.pop() if len(t) == 1 else IGNORE_INDEX) for c, t in colours.items()}
        n = len(self.source_classes)
        return LabelDecoder(
            dict(self.to_trainid), f"Mapillary {self.version} ids 0-{n - 1}", colour_table
        )

    def _label_dir(self, base: Path) -> Path:
        labels = base / self.version / "labels"
        return labels if labels.is_dir() else base / self.version

    def splits(self, root: Path) -> list[str]:
        if (root / "images").is_dir():
            return []
        return [s for s in _subdirs(root) if (root / s / "images").is_dir()]

    def normalise_split(self, split: str) -> str:
        return {"train": "training", "val": "validation"}.get(split, split)

    def find(self, root: Path, split: str | None) -> Listing:
        base = root / split if split else root
        return pair_files(
            base / "images",
            self._label_dir(base),
            _stem_key(IMAGE_EXTENSIONS),
            _suffix_key(".png"),
            split=split,
        )


class MapillaryV12Format(_MapillaryFormat):
    name = "mapillary_v1.2"
    version = "v1.2"
    source_classes = MAPILLARY_V12_CLASSES
    source_palette = MAPILLARY_V12_PALETTE
    to_trainid = MAPILLARY_V12_TO_TRAINID


class MapillaryV20Format(_MapillaryFormat):
    name = "mapillary_v2.0"
    version = "v2.0"
    source_classes = MAPILLARY_V20_CLASSES
    source_palette = MAPILLARY_V20_PALETTE
    to_trainid = MAPILLARY_V20_TO_TRAINID


class CamVidFormat(DatasetFormat):
    """CamVid in SegNet's layout: 11 classes, raw 11 = void; images may be .jpg, labels .png."""

    name = "camvid"
    layout = "<split>/*.jpg|png + <split>annot/*.png (split: train, val, test)"
    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def make_decoder(self) -> LabelDecoder:
        table = {**_identity_table(11), 11: IGNORE_INDEX}
        return LabelDecoder(table, "CamVid ids 0-11")

    def splits(self, root: Path) -> list[str]:
        return [s for s in _subdirs(root) if (root / f"{s}annot").is_dir()]

    def find(self, root: Path, split: str | None) -> Listing:
        if split is None:
            raise DataError(f"{root}: no CamVid split folders found; expected {self.layout}")
        return pair_files(
            root / split,
            root / f"{split}annot",
            _stem_key(IMAGE_EXTENSIONS),
            _suffix_key(".png"),
            split=split,
        )


class CarlaScapesFormat(DatasetFormat):
    """CarlaScapes: labelIds 1-19 are the Cityscapes classes in trainId order; others ignored."""

    name = "carlascapes"
    layout = "[<split>/]*_img.jpg + *_labelIds.png"

    def make_decoder(self) -> LabelDecoder:
        table = {i: (i - 1 if 1 <= i <= 19 else IGNORE_INDEX) for i in range(256)}
        return LabelDecoder(table, "CarlaScapes ids 0-255")

    def splits(self, root: Path) -> list[str]:
        if list_files(root, ("_img.jpg",)):
            return []
        return [s for s in _subdirs(root) if list_files(root / s, ("_img.jpg",))]

    def find(self, root: Path, split: str | None) -> Listing:
        folder = root / split if split else root
        return pair_files(
            folder, folder, _suffix_key("_img.jpg"), _suffix_key("_labelIds.png"), split=split
        )


class IDDLiteFormat(DatasetFormat):
    """IDD Lite: the 7 IDD level-1 classes (ids 0-6, 255 = ignore), a folder per sequence.

    Each sample's domain is its sequence folder (``meta["domain"]``), so frames can be grouped
    or split by sequence; the dataset's domain stays ``idd_lite``.
    """

    name = "idd_lite"
    layout = "leftImg8bit/<split>/<seq>/*_image.jpg + gtFine/<split>/<seq>/*_label.png (ids 0-6)"
    classes = IDD_LEVEL1_CLASSES
    palette = IDD_LEVEL1_PALETTE

    def splits(self, root: Path) -> list[str]:
        return [s for s in _subdirs(root / "leftImg8bit") if (root / "gtFine" / s).is_dir()]

    def find(self, root: Path, split: str | None) -> Listing:
        labels = root / "gtFine" / (split or "")
        listing = pair_files(
            root / "leftImg8bit" / (split or ""),
            labels,
            _suffix_key("_image.jpg"),
            _suffix_key("_label.png"),
            recursive=True,
            split=split,
        )
        listing.pairs = [
            dataclasses.replace(s, domain=_sequence(s.label, labels)) for s in listing.pairs
        ]
        return listing


def _sequence(label: Path, split_root: Path) -> str | None:
    """The sequence folder of a label below its split folder (None for files directly in it)."""
    folder = label.parent.relative_to(split_root).as_posix()
    return None if folder == "." else folder


class LoveDAFormat(_TwoFolderFormat):
    """LoveDA (mmsegmentation layout): 0 = no-data -> ignore, 1..7 -> 0..6."""

    name = "loveda"
    layout = "img_dir/[<split>/]*.png + ann_dir/[<split>/]*.png (0 no-data, 1-7 classes)"
    image_dir, label_dir = "img_dir", "ann_dir"
    classes = LOVEDA_CLASSES
    palette = LOVEDA_PALETTE

    def make_decoder(self) -> LabelDecoder:
        return LabelDecoder({0: IGNORE_INDEX, **{i: i - 1 for i in range(1, 8)}}, "LoveDA ids 0-7")


class _ISPRSFormat(_TwoFolderFormat):
    """ISPRS tiles from mmsegmentation's converter: 0 = boundary -> ignore, 1..6 -> 0..5."""

    layout = "img_dir/[<split>/]*.png + ann_dir/[<split>/]*.png (0 boundary, 1-6 classes)"
    image_dir, label_dir = "img_dir", "ann_dir"
    classes = ISPRS_CLASSES
    palette = ISPRS_PALETTE

    def make_decoder(self) -> LabelDecoder:
        return LabelDecoder({0: IGNORE_INDEX, **{i: i - 1 for i in range(1, 7)}}, "ISPRS ids 0-6")


class PotsdamFormat(_ISPRSFormat):
    name = "potsdam"


class VaihingenFormat(_ISPRSFormat):
    name = "vaihingen"


MAPPING_FILES = ("classes.json", "classes.yaml", "classes.yml")


def _default_palette(n: int) -> list[Color]:
    """Distinct colours by spreading the bits of the class index over R, G, B (PASCAL style)."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index + 1
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


def load_mapping_file(path: Path) -> dict[str, Any]:
    """Read a ``{"classes": [...], "mapping": {raw_id: train_id}, "palette": [...]}`` file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise DataError(f"{path}: cannot read the mapping file ({err.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as err:  # both parsers raise their own error types
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()} ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list):
        raise ConfigError(f'{path}: needs a "classes" list of names (and optionally "mapping")')
    classes = [str(c) for c in spec["classes"]]
    mapping = {}
    for raw, train in (spec.get("mapping") or {}).items():
        try:
            raw_id, train_id = int(raw), int(train)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: mapping entry {raw!r}: {train!r} is not integer") from None
        if not (0 <= train_id < len(classes) or train_id == IGNORE_INDEX):
            raise ConfigError(
                f"{path}: mapping {raw_id} -> {train_id} is outside the {len(classes)} classes "
                "(use 255 to ignore)"
            )
        mapping[raw_id] = train_id
    palette = spec.get("palette") or _default_palette(len(classes))
    if len(palette) != len(classes):
        raise ConfigError(f"{path}: palette has {len(palette)} colours for {len(classes)} classes")
    return {"classes": classes, "mapping": mapping, "palette": [tuple(c) for c in palette]}


class FolderFormat(_TwoFolderFormat):
    """Your own data: ``images/`` + ``labels/`` (single-channel id PNGs), paired by file stem.

    Classes come from ``mapping=`` (a JSON/YAML file), else from ``classes.json``/``.yaml``
    in the dataset folder, else from ``classes=[...]``. With a ``mapping`` table, raw ids it
    does not list are errors (map them to 255 to ignore them); without one, raw ids are
    training ids ``0..K-1`` and 255 is ignore.

    Args:
        mapping: path of the mapping file.
        classes: class names when there is no mapping file.
        palette: colours for ``classes``.
    """

    name = "folder"
    layout = "images/[<split>/]* + labels/[<split>/]*.png (+ classes.json)"

    def __init__(
        self,
        mapping: str | Path | None = None,
        classes: Sequence[str] | None = None,
        palette: Sequence[Color] | None = None,
    ):
        self.mapping_path = Path(mapping) if mapping else None
        self.given_classes = list(classes) if classes else None
        self.given_palette = [tuple(c) for c in palette] if palette else None
        self.decoder = None  # resolved per root in prepare()

    def prepare(self, root: Path) -> None:
        path = self.mapping_path
        if path is None:
            path = next((root / n for n in MAPPING_FILES if (root / n).is_file()), None)
        if path is not None:
            spec = load_mapping_file(path)
            self.classes, self.palette = spec["classes"], spec["palette"]
            table = spec["mapping"] or _identity_table(len(self.classes))
            valid = (
                f"raw ids of {path.name}" if spec["mapping"] else f"ids 0-{len(self.classes) - 1}"
            )
        elif self.given_classes:
            self.classes = self.given_classes
            self.palette = self.given_palette or _default_palette(len(self.classes))
            table, valid = _identity_table(len(self.classes)), f"ids 0-{len(self.classes) - 1}"
        else:
            raise DataError(
                f"{root}: the folder format needs class names; write {root / 'classes.json'} "
                'as {"classes": [...], "mapping": {raw_id: train_id}} or pass a mapping file'
            )
        self.decoder = LabelDecoder(table, valid)


FORMATS: dict[str, type[DatasetFormat]] = {
    "cityscapes": CityscapesFormat,
    "gta5": GTA5Format,
    "synthia": SynthiaFormat,
    "bdd100k": BDD100KFormat,
    "acdc": ACDCFormat,
    "mapillary_v1.2": MapillaryV12Format,
    "mapillary_v2.0": MapillaryV20Format,
    "camvid": CamVidFormat,
    "carlascapes": CarlaScapesFormat,
    "idd_lite": IDDLiteFormat,
    "loveda": LoveDAFormat,
    "potsdam": PotsdamFormat,
    "vaihingen": VaihingenFormat,
    "folder": FolderFormat,
}


def get_format(name: str, **options: Any) -> DatasetFormat:
    """The reader for format ``name`` with its options (e.g. ``condition`` for ACDC).

    Raises:
        DataError: for an unknown name, suggesting the closest one.
        ConfigError: for an option the format does not take.
    """
    cls = FORMATS.get(name)
    if cls is None:
        close = closest(name, FORMATS)
        suggestion = f"did you mean {close!r}? " if close else ""
        raise DataError(
            f"unknown dataset format {name!r}; {suggestion}known formats: {', '.join(FORMATS)}"
        )
    check_kwargs(options, cls, where="dataset options", owner=f"format {name!r}")
    return cls(**options)


def scan_format(
    path: str | Path, format: str, split: str | None = None, **options: Any
) -> tuple[DatasetFormat, Listing]:
    """The reader and everything it finds under ``path`` (unpaired files included)."""
    root = Path(path)
    fmt = get_format(format, **options)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; expected {fmt.layout}")
    fmt.prepare(root)
    return fmt, fmt.scan(root, split)


def build_dataset(
    path: str | Path,
    format: str,
    split: str | None = None,
    domain: str | None = None,
    transform: Callable[[dict], dict] | None = None,
    **options: Any,
) -> SegDataset:
    """Read a dataset folder in one of the :data:`FORMATS` layouts.

    Args:
        path: the dataset's root folder.
        format: a key of :data:`FORMATS`.
        split: one split (``"train"``, ``"val"``, ...; ACDC also ``"night/val"``), or ``None``
            for every split in the folder.
        domain: the domain name; defaults to the format name (ACDC: the condition).
        transform: callable applied to each item dict (see :mod:`pivotseg.data.transforms`).
        **options: format options (cityscapes ``label_kind``, acdc ``condition``, folder
            ``mapping``/``classes``/``palette``).

    Raises:
        DataError: one line naming the folder or file and what to do, when the folder is
            missing or empty, or images and labels do not pair up.
    """
    # torch only here: scanning a folder (pivotseg data check) must not pay for its import
    from pivotseg.data.dataset import SegDataset

    fmt, listing = scan_format(path, format, split, **options)
    root = Path(path)
    if listing.unpaired_images:
        first = listing.unpaired_images[0]
        raise DataError(
            f"{first}: image has no label ({len(listing.unpaired_images)} such images); expected "
            f"{fmt.layout}; run `pivotseg data check {root} --format {format}` for the full list"
        )
    if listing.unpaired_labels:
        first = listing.unpaired_labels[0]
        raise DataError(
            f"{first}: label has no image ({len(listing.unpaired_labels)} such labels); run "
            f"`pivotseg data check {root} --format {format}` for the full list"
        )
    if not listing.pairs:
        where = f"{root} (split {split})" if split else str(root)
        raise DataError(f"{where}: no {format} images found; expected {fmt.layout}")
    return SegDataset(
        listing.pairs,
        classes=fmt.classes,
        palette=fmt.palette,
        domain=domain or fmt.default_domain(split),
        decode_label=fmt.read_label,
        transform=transform,
        format_name=format,
    )
