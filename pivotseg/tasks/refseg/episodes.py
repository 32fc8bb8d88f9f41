"""k-shot episodes over an FSS-1000-style folder and their IoU.

Layout: one folder per class, each holding ``N.jpg`` images with ``N.png`` masks (FSS-1000
numbers them 1..10). An episode per class is deterministic: the first ``k`` pairs in numeric
order are the references, every other pair a target. A class's IoU is the intersection summed
over its targets divided by the union summed over them (the FSS-1000 / HSNet convention);
the mean IoU is the mean over classes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pivotseg.errors import DataError
from pivotseg.tasks.refseg.base import ReferenceSegmenter
from pivotseg.tasks.refseg.images import IMAGE_SUFFIXES, read_image, read_mask

Pair = tuple[Path, Path]


def _order(path: Path):
    # Numeric stems first in numeric order (FSS-1000: 1..10), then the rest by name.
    return (0, int(path.stem), "") if re.fullmatch(r"\d+", path.stem) else (1, 0, path.stem)


def class_pairs(folder: Path) -> list[Pair]:
    """(image, mask) pairs of one class folder, in numeric order."""
    pairs = []
    for image in sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_order
    ):
        if image.suffix.lower() == ".png":
            continue  # PNGs are the masks
        mask = image.with_suffix(".png")
        if not mask.exists():
            raise DataError(
                f"{image}: has no mask {mask.name} beside it (FSS layout: N.jpg + N.png)"
            )
        pairs.append((image, mask))
    return pairs


def list_classes(root: str | Path) -> dict[str, list[Pair]]:
    """Class name -> its pairs, for every sub-folder of ``root`` holding pairs."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such episodes folder (expected one folder per class)")
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        pairs = class_pairs(folder)
        if pairs:
            classes[folder.name] = pairs
    if not classes:
        raise DataError(f"{root}: no class folder with N.jpg + N.png pairs")
    return classes


def episode(pairs: list[Pair], shots: int, name: str = "") -> tuple[list[Pair], list[Pair]]:
    """The first ``shots`` pairs as references, the rest as targets."""
    if shots < 1:
        raise DataError(f"--shots must be at least 1, got {shots}")
    if len(pairs) <= shots:
        raise DataError(
            f"class {name!r} has {len(pairs)} image/mask pairs; {shots}-shot needs at least "
            f"{shots + 1}"
        )
    return pairs[:shots], pairs[shots:]


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(image_path)
    return image, read_mask(mask_path, image.shape[:2])


@dataclass
class EpisodeResult:
    """Per-class IoU (summed intersection / summed union), the class mean, and counts."""

    per_class: dict[str, float] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)

    @property
    def mean_iou(self) -> float:
        return float(np.mean(list(self.per_class.values()))) if self.per_class else float("nan")


def evaluate_episodes(
    method: ReferenceSegmenter,
    root: str | Path,
    shots: int = 1,
    classes: list[str] | None = None,
    max_targets: int | None = None,
    on_target: Callable[[str, Path, np.ndarray, float], None] | None = None,
    show_progress: bool = True,
) -> EpisodeResult:
    """Fit ``method`` on each class's references and score it on the class's targets.

    Args:
        method: any reference-segmentation method (re-fitted per class).
        root: the FSS-style folder.
        shots: references per class (``k``).
        classes: restrict to these class names.
        max_targets: at most this many targets per class (the first ones).
        on_target: called with ``(class, target path, predicted mask, score)`` per target.
    """
    available = list_classes(root)
    names = classes if classes is not None else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DataError(f"{root}: no class folder {unknown[0]!r}; found {', '.join(available)}")
    result = EpisodeResult()
    for name in tqdm(names, desc=f"{shots}-shot episodes", disable=not show_progress):
        refs, targets = episode(available[name], shots, name)
        ref_data = [read_pair(*p) for p in refs]
        method.fit([r[0] for r in ref_data], [r[1] for r in ref_data])
        inter = union = 0
        for image_path, mask_path in targets[:max_targets]:
            image, truth = read_pair(image_path, mask_path)
            mask, score = method.segment(image)
            inter += int((mask & truth).sum())
            union += int((mask | truth).sum())
            if on_target is not None:
                on_target(name, image_path, mask, score)
        result.per_class[name] = inter / union if union else float("nan")
        result.targets[name] = len(targets[:max_targets])
    return result
