"""``pivotseg ovseg`` as one function: segment images and/or score a dataset with a CLIP
segmenter, its classes named in words or taken from the dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pivotseg.errors import ConfigError
from pivotseg.tasks.openvocab.run import evaluate_dataset, predict_images
from pivotseg.tasks.openvocab.segmenter import OpenVocabSegmenter


def run_ovseg(
    images: Sequence[str | Path],
    out: str | Path | None,
    *,
    clip: str,
    variant: str = "naclip",
    classes: Sequence[str] | None = None,
    classes_file: str | Path | None = None,
    eval_data: str | Path | None = None,
    eval_format: str = "folder",
    eval_split: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    overlay: bool = False,
    legend: bool = True,
    vfm: str | None = "dinov2",
    on_written: Callable[[list[Path]], None] | None = None,
    **segmenter_options,
) -> dict | None:
    """Segment ``images`` into ``out`` (:func:`predict_images`) and, with ``eval_data``, score
    the dataset there (also written to ``out/metrics.json`` when ``out`` is given).

    Classes: ``classes``, else the lines of ``classes_file``, else the dataset's. ``device``
    defaults to CUDA when available. ``vfm`` applies to ProxyCLIP only; ``segmenter_options``
    go to :class:`OpenVocabSegmenter` (background, threshold, templates, mode, ...).
    ``on_written`` receives the label PNGs once the images are done, before any scoring.

    Returns:
        :func:`evaluate_dataset`'s result, or None without ``eval_data``.
    """
    from pivotseg.tasks.openvocab.classes import read_classes_file

    dataset = None
    if eval_data:
        from pivotseg.data import build_dataset
        from pivotseg.data.transforms import eval_transforms

        dataset = build_dataset(eval_data, eval_format, eval_split, transform=eval_transforms())
    if classes is not None:
        classes = list(classes)
    elif classes_file:
        classes = read_classes_file(classes_file)
    elif dataset is not None:
        classes = list(dataset.classes)
    else:
        raise ConfigError("ovseg: name the classes with --classes or --classes-file")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    segmenter = OpenVocabSegmenter(
        clip,
        variant,
        classes,
        vfm=vfm if variant == "proxyclip" else None,
        **segmenter_options,
    ).to(device)
    if images:
        palette = dataset.palette if dataset is not None and classes == dataset.classes else None
        written = predict_images(segmenter, images, out, palette, overlay=overlay, legend=legend)
        if on_written is not None:
            on_written(written)
    if dataset is None:
        return None
    result = evaluate_dataset(segmenter, dataset, limit=limit)
    if out:
        write_metrics(
            Path(out) / "metrics.json",
            result,
            len(dataset),
            limit,
            eval_data,
            eval_split,
            variant=variant,
            clip=clip,
        )
    return result


def write_metrics(
    path: Path,
    result: dict,
    dataset_size: int,
    limit: int | None,
    eval_data: str | Path,
    eval_split: str | None,
    **settings,
) -> None:
    """The scores in the schema of :mod:`pivotseg.evaluation.results` (percent, by class)."""
    from pivotseg.evaluation.results import confusion_entry, results_document, write_json

    frames = dataset_size if limit is None else min(limit, dataset_size)
    name = Path(eval_data).name + (f"/{eval_split}" if eval_split else "")
    entry = confusion_entry(name, result, result["class_names"], frames=frames, limit=limit)
    document = results_document("ovseg", [entry], **settings, data=str(eval_data))
    write_json(path, document)
