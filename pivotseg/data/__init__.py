"""Datasets in their own on-disk layouts, DGSS transforms, batching and class taxonomies.

``build_dataset(path, format, split)`` reads any of :data:`FORMATS`; items are
``dict(image, label, meta)`` with labels in training ids (255 = ignore). See docs/datasets.md.

Reading and checking folders needs NumPy and PIL only; the torch side (the dataset object,
batching, transforms) is imported on first use, so ``pivotseg data check`` never loads torch.
"""

from pivotseg.data.check import DatasetReport, Problem, scan_dataset
from pivotseg.data.formats import FORMATS, DatasetFormat, build_dataset, get_format
from pivotseg.data.listing import LabelDecoder, Listing, Sample
from pivotseg.data.taxonomy import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IDD_LEVEL1_CLASSES,
    IDD_LEVEL1_PALETTE,
    IGNORE_INDEX,
    class_mapping,
    convert_label,
    convert_logits,
    ignore_unmapped,
    unmapped_classes,
)

_LOADER = ("collate", "seed_worker")
_TRANSFORMS = ("Compose", "ToTensor", "eval_transforms", "train_transforms")


def __getattr__(name: str):
    # The torch side loads on first use (PEP 562); reading and checking folders never needs it.
    if name == "SegDataset":
        from pivotseg.data.dataset import SegDataset as value
    elif name in _LOADER:
        from pivotseg.data import loader

        value = getattr(loader, name)
    elif name in _TRANSFORMS:
        from pivotseg.data import transforms

        value = getattr(transforms, name)
    else:
        raise AttributeError(f"module 'pivotseg.data' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "FORMATS",
    "IDD_LEVEL1_CLASSES",
    "IDD_LEVEL1_PALETTE",
    "IGNORE_INDEX",
    "Compose",
    "DatasetFormat",
    "DatasetReport",
    "LabelDecoder",
    "Listing",
    "Problem",
    "Sample",
    "SegDataset",
    "ToTensor",
    "build_dataset",
    "class_mapping",
    "collate",
    "convert_label",
    "convert_logits",
    "eval_transforms",
    "get_format",
    "ignore_unmapped",
    "scan_dataset",
    "seed_worker",
    "train_transforms",
    "unmapped_classes",
]
