"""The one schema of the evaluation results that ``pivotseg eval``, ``pivotseg ovseg`` and
``pivotseg refseg eval`` write as JSON (documented in docs/evaluation.md)::

    {
      "schema": "pivotseg.results/1",
      "task": "eval",                       # or "ovseg", "refseg"
      "units": "percent",
      ...                                   # what was scored: checkpoint, variant, method...
      "datasets": [
        {"name": "camvid_test", "frames": 233, "limit": null,
         "miou": 61.2, "acc": 90.1, "macc": 70.3,
         "per_class": {"sky": 91.2, "building": 80.1, "bicyclist": null}}
      ],
      "mean_miou": 61.2
    }

Scores are percentages. ``per_class`` is keyed by class (or object) name, in the dataset's
order. A score that is undefined (a class absent from both labels and predictions) is ``null``:
the file is strict JSON, never a bare ``NaN``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SCHEMA = "pivotseg.results/1"


def finite_or_none(value) -> float | None:
    """``value`` as a float, ``None`` when it is missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def percent(fraction) -> float | None:
    """A fraction (0..1) as a percentage; ``None`` when undefined."""
    value = finite_or_none(fraction)
    return None if value is None else value * 100.0


def named_scores(names: Sequence[str], values: Iterable) -> dict[str, float | None]:
    """``{name: value}`` in order, values already in percent; a repeated name gets `` (2)``,
    `` (3)``... so that no score is lost (``--classes "car,car"``)."""
    values = list(values)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} class names for {len(values)} scores")
    out: dict[str, float | None] = {}
    for name, value in zip(names, values):
        key, k = str(name), 1
        while key in out:
            k += 1
            key = f"{name} ({k})"
        out[key] = finite_or_none(value)
    return out


def dataset_entry(
    name: str,
    *,
    frames: int,
    limit: int | None,
    miou,
    per_class: Mapping[str, float | None],
    **scores,
) -> dict:
    """One element of ``datasets``: ``scores`` are further numbers in percent (``acc``...)."""
    entry = {"name": str(name), "frames": int(frames), "limit": limit, "miou": finite_or_none(miou)}
    entry.update({key: finite_or_none(value) for key, value in scores.items()})
    entry["per_class"] = {str(k): finite_or_none(v) for k, v in per_class.items()}
    return entry


def confusion_entry(
    name: str, metrics: Mapping, class_names: Sequence[str], *, frames: int, limit: int | None
) -> dict:
    """An entry from :meth:`~pivotseg.evaluation.ConfusionMatrix.compute` (fractions)."""
    return dataset_entry(
        name,
        frames=frames,
        limit=limit,
        miou=percent(metrics["miou"]),
        acc=percent(metrics["acc"]),
        macc=percent(metrics["macc"]),
        per_class=named_scores(class_names, [percent(v) for v in metrics["iou"]]),
    )


def results_document(task: str, datasets: list[dict], mean_miou=None, **context) -> dict:
    """The whole document; ``mean_miou`` defaults to the mean of the datasets' defined mIoU."""
    if mean_miou is None:
        defined = [d["miou"] for d in datasets if d["miou"] is not None]
        mean_miou = sum(defined) / len(defined) if defined else None
    return {
        "schema": SCHEMA,
        "task": task,
        "units": "percent",
        **context,
        "datasets": datasets,
        "mean_miou": finite_or_none(mean_miou),
    }


def to_json(document: dict) -> str:
    """Strict JSON text (``allow_nan=False``: a NaN left anywhere is turned into ``null``)."""
    return json.dumps(_without_nan(document), indent=2, allow_nan=False)


def write_json(path: str | Path, document: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(document) + "\n")
    return path


def _without_nan(value):
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, Mapping):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def format_per_class(per_class: Mapping[str, float | None], title: str) -> str:
    """``title`` then one line per class: its IoU in percent, ``–`` when undefined."""
    width = max([len(name) for name in per_class] + [5])
    lines = [title]
    for name, value in per_class.items():
        lines.append(f"  {name:<{width}}  {'–' if value is None else f'{value:6.2f}':>6}")
    return "\n".join(lines)
