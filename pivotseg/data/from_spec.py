"""Open the dataset a :class:`~pivotseg.config.DatasetSpec` names, adverse copies included.

A spec with ``corruptions`` (``[fog:3, night:3, ...]``) stands for its folder under those
conditions, each frame getting one of them (:func:`pivotseg.data.corrupt.corrupt_dataset` with
``mix=True``). The copy is written once into a cache folder named by a hash of everything that
determines its bytes (source folder, format, split, options, corruptions, seed), so every run and
every benchmark row scores the same files, and ``pivotseg data corrupt --mix`` with the same
arguments writes identical ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from pivotseg.config import DatasetSpec
from pivotseg.data.dataset import SegDataset
from pivotseg.data.formats import build_dataset


def cache_root() -> Path:
    """``$PIVOTSEG_CACHE/targets``, default ``~/.cache/pivotseg/targets``."""
    base = os.environ.get("PIVOTSEG_CACHE") or Path.home() / ".cache" / "pivotseg"
    return Path(base).expanduser() / "targets"


def corrupted_copy_path(spec: DatasetSpec) -> Path:
    """Where the adverse copy of ``spec`` is cached (it may not exist yet)."""
    key = {
        "source": str(Path(spec.path).resolve()),
        "format": spec.format,
        "split": spec.split,
        "options": {k: str(v) for k, v in sorted(spec.options.items())},
        "corruptions": list(spec.corruptions),
        "seed": spec.corruption_seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = "-".join(p for p in (Path(spec.path).name, spec.split) if p)
    return cache_root() / f"{stem}-{digest}"


def spec_root(spec: DatasetSpec, progress: bool = True) -> Path:
    """The folder to read for ``spec``: its path, or (with corruptions) its cached adverse copy,
    written first when missing or unfinished."""
    if not spec.corruptions:
        return Path(spec.path)
    from pivotseg.data.corrupt import MANIFEST, corrupt_dataset

    out = corrupted_copy_path(spec)
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return out
    corrupt_dataset(
        spec.path,
        spec.format,
        out,
        spec.corruptions,
        seed=spec.corruption_seed,
        split=spec.split,
        mix=True,
        progress=progress,
        **spec.options,
    )
    return out


def dataset_from_spec(
    spec: DatasetSpec, transform: Callable[[dict], dict] | None = None
) -> SegDataset:
    """:func:`~pivotseg.data.formats.build_dataset` for a spec (adverse copy made if needed)."""
    return build_dataset(
        spec_root(spec), spec.format, spec.split, spec.domain, transform=transform, **spec.options
    )
