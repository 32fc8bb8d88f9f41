"""Datasets in their own on-disk layouts, DGSS transforms, batching and class taxonomies.

``build_dataset(path, format, split)`` reads any of :data:`FORMATS`; items are
``dict(image, label, meta)`` with labels in training ids (255 = ignore). See docs/datasets.md.
"""

from pivotseg.data.check import DatasetReport, Problem, scan_dataset
from pivotseg.data.dataset import LabelDecoder, Listing, Sample, SegDataset
from pivotseg.data.formats import FORMATS, DatasetFormat, build_dataset, get_format
from pivotseg.data.loader import collate, seed_worker
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
from pivotseg.data.transforms import Compose, ToTensor, eval_transforms, train_transforms

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
