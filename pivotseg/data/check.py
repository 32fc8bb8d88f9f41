"""Scan a whole dataset folder and collect every problem at once (``pivotseg data check``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pivotseg.data.formats import scan_format
from pivotseg.data.io import LowRangeImage, image_size, read_image_bits, read_label
from pivotseg.data.taxonomy import IGNORE_INDEX
from pivotseg.errors import DataError


@dataclass
class Problem:
    """One thing wrong with the dataset: ``kind`` is one of :data:`PROBLEM_KINDS`."""

    kind: str
    path: Path
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


PROBLEM_KINDS = (
    "empty",
    "unreadable folder",
    "broken link",
    "unpaired image",
    "unpaired label",
    "unreadable image",
    "low-range 16-bit image",
    "unreadable label",
    "values outside classes",
    "size mismatch",
)


@dataclass
class DatasetReport:
    """Counts, the per-class pixel histogram and the problems of a dataset folder."""

    root: Path
    format: str
    split: str | None
    classes: list[str]
    num_images: int = 0
    num_labels: int = 0
    num_pairs: int = 0
    pixel_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignored_pixels: int = 0
    sixteen_bit_images: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def frequencies(self) -> list[tuple[int, str, int, float]]:
        """``(train id, class name, pixels, share of labelled pixels)`` for every class."""
        total = max(int(self.pixel_counts.sum()), 1)
        return [
            (i, name, int(n), float(n) / total)
            for i, (name, n) in enumerate(zip(self.classes, self.pixel_counts))
        ]


def scan_dataset(
    path: str | Path,
    format: str,
    split: str | None = None,
    progress: bool = True,
    check_images: bool = True,
    **options: Any,
) -> DatasetReport:
    """Read every image and label of a dataset and report all problems found, without stopping.

    Args:
        path: the dataset folder.
        format: a key of :data:`~pivotseg.data.formats.FORMATS`.
        split: one split, or ``None`` for all.
        progress: show a tqdm bar.
        check_images: decode every image fully (finds truncated files); ``False`` reads only the
            image headers for the size check (``data stats``).
        **options: format options (see :func:`~pivotseg.data.formats.build_dataset`).

    Raises:
        DataError: only when the folder or format cannot be used at all (missing folder, unknown
            format, unreadable mapping file); file-level problems go into the report.
    """
    fmt, listing = scan_format(path, format, split, **options)
    report = DatasetReport(Path(path), format, split, list(fmt.classes))
    report.pixel_counts = np.zeros(len(fmt.classes), dtype=np.int64)
    report.num_images = len(listing.pairs) + len(listing.unpaired_images)
    report.num_labels = len(listing.pairs) + len(listing.unpaired_labels)
    report.num_pairs = len(listing.pairs)
    problems = report.problems
    problems += hidden_files(Path(path))
    if report.num_images == 0 and report.num_labels == 0:
        problems.append(Problem("empty", Path(path), f"no images found; expected {fmt.layout}"))
    caveat = _unpaired_caveat(problems)
    for image in listing.unpaired_images:
        problems.append(Problem("unpaired image", image, "no label file matches its name" + caveat))
    for label in listing.unpaired_labels:
        problems.append(Problem("unpaired label", label, "no image file matches its name" + caveat))
    for sample in tqdm(listing.pairs, desc=f"checking {format}", disable=not progress):
        image_hw = _image_size(sample.image, check_images, report)
        try:
            raw = read_label(sample.label)
        except DataError as err:
            problems.append(Problem("unreadable label", sample.label, _detail(err, sample.label)))
            continue
        try:
            label = fmt.decode(raw, sample.label)
        except DataError as err:
            problems.append(
                Problem("values outside classes", sample.label, _detail(err, sample.label))
            )
            continue
        if image_hw is not None and tuple(label.shape[:2]) != image_hw:
            problems.append(
                Problem(
                    "size mismatch",
                    sample.label,
                    f"label {label.shape[1]}x{label.shape[0]}, image {sample.image.name} "
                    f"{image_hw[1]}x{image_hw[0]}",
                )
            )
        valid = label[label != IGNORE_INDEX]
        report.pixel_counts += np.bincount(valid.ravel(), minlength=len(fmt.classes))[
            : len(fmt.classes)
        ]
        report.ignored_pixels += int(label.size - valid.size)
    return report


def _image_size(path: Path, decode: bool, report: DatasetReport) -> tuple[int, int] | None:
    try:
        if not decode:
            return image_size(path)
        image, bits = read_image_bits(path)
        report.sixteen_bit_images += bits == 16
        return tuple(image.shape[:2])
    except LowRangeImage as err:
        report.problems.append(Problem("low-range 16-bit image", path, _detail(err, path)))
    except DataError as err:
        report.problems.append(Problem("unreadable image", path, _detail(err, path)))
    return None


def hidden_files(root: Path) -> list[Problem]:
    """Folders that cannot be listed and links to nothing under ``root``.

    Readers skip both without a word (a glob sees an unreadable folder as empty, a broken link
    as no file), so their files would otherwise surface only as "unpaired" partners.
    """
    problems = []
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            continue
        seen.add(real)
        try:
            if not os.access(folder, os.R_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            reason = err.strerror or str(err)
            problems.append(
                Problem(
                    "unreadable folder",
                    folder,
                    f"cannot list it ({reason}); its files were not checked; give read access "
                    f"(chmod -R a+rX {folder}) and check again",
                )
            )
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink() and not path.exists():
                problems.append(
                    Problem(
                        "broken link",
                        path,
                        f"points to {os.readlink(path)}, which does not exist; restore the "
                        "target or remove the link",
                    )
                )
            elif _is_dir(entry):
                stack.append(path)
    return sorted(problems, key=lambda p: str(p.path))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _unpaired_caveat(problems: list[Problem]) -> str:
    where = {"unreadable folder": "in an unreadable folder", "broken link": "behind a broken link"}
    found = [text for kind, text in where.items() if any(p.kind == kind for p in problems)]
    return f", or its partner is {' or '.join(found)} reported above" if found else ""


def _detail(err: DataError, path: Path) -> str:
    """The error message without its leading ``path: `` (the report prints the path itself)."""
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text
