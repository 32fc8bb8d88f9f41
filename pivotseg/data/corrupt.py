"""Adverse-condition copies of a dataset: fog, night, rain, snow, motion blur and glare.

:func:`corrupt_dataset` reads a dataset folder with its format reader, applies albumentations'
weather and lighting transforms at a fixed severity (1-5, parameters in :data:`SEVERITY_TABLE`)
and writes every image and its label (copied byte for byte) at the same relative path under the
output folder, so the copy reads with the same ``--format``. One sub-folder per corruption
(``OUT/fog3/...``), or with ``mix=True`` a single copy where each frame gets exactly one of the
corruptions. ``OUT/corruptions.json`` records the library version, each transform's exact
parameters, the seed and (mixed) the per-frame assignment. docs/datasets.md has the table.

Each frame's random draws come from a seed derived from (seed, corruption, frame path), so an
image does not depend on which other frames or corruptions were written with it: the fog3 frame
of a mixed copy is the same file as in a per-corruption ``fog3`` copy, and a resumed run writes
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pivotseg.data.formats import MAPPING_FILES, build_dataset, scan_format
from pivotseg.data.io import read_image
from pivotseg.errors import ConfigError, DataError

MANIFEST = "corruptions.json"
SEVERITIES = (1, 2, 3, 4, 5)
JPEG_QUALITY = 95

# One value per severity 1..5. Pixel sizes (blur kernels, flare radius, drop sizes) are tuned for
# ~480x360 frames (CamVid); resize larger images first for the same visual strength.
SEVERITY_TABLE: dict[str, dict[str, tuple]] = {
    "fog": {
        "fog_coef": (0.2, 0.3, 0.4, 0.5, 0.6),
        "brightness": (0.08, 0.16, 0.24, 0.32, 0.40),
        "contrast": (-0.15, -0.30, -0.45, -0.60, -0.75),
    },
    "night": {
        "gamma": (120, 135, 150, 165, 180),
        "contrast": (-0.25, -0.40, -0.50, -0.60, -0.70),
        "iso_intensity": (0.05, 0.10, 0.15, 0.20, 0.25),
    },
    "rain": {
        "rain_type": ("drizzle", "default", "heavy", "torrential", "torrential"),
        "blur": (3, 3, 5, 5, 7),
        "brightness_coefficient": (0.9, 0.8, 0.7, 0.65, 0.55),
    },
    "snow": {
        "snow_point": (0.0, 0.05, 0.10, 0.15, 0.20),
        "brightness_coeff": (1.3, 1.5, 1.7, 1.9, 2.1),
        "flakes": ("drizzle", "default", "heavy", "torrential", "torrential"),
    },
    "motion_blur": {"kernel": (5, 9, 13, 17, 21)},
    "glare": {"src_radius": (100, 150, 200, 250, 300)},
}

DESCRIPTIONS = {
    "fog": "RandomFog (white haze patches) + RandomBrightnessContrast (brighter, less contrast)",
    "night": "RandomGamma (darker mid-tones) + RandomBrightnessContrast (gain < 1) + ISONoise",
    "rain": "RandomRain (streaks, dimmer light)",
    "snow": "RandomSnow bleach (snow-covered bright surfaces) + RandomRain as white flakes",
    "motion_blur": "MotionBlur (random direction, centred kernel)",
    "glare": "RandomSunFlare physics_based (sun and lens flare in the upper half)",
}

KNOWN = tuple(SEVERITY_TABLE)


def _albumentations():
    # albumentations asks PyPI for a newer version at import unless told not to.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations
    except ImportError as err:  # optional dependency
        raise ConfigError(
            "pivotseg data corrupt needs albumentations: pip install 'pivotseg[corrupt]'"
        ) from err
    return albumentations


def _fixed(value: float) -> tuple[float, float]:
    return (value, value)


def build_transform(name: str, severity: int):
    """The albumentations pipeline of one corruption at one severity (always applied)."""
    A = _albumentations()
    v = {key: values[severity - 1] for key, values in SEVERITY_TABLE[name].items()}
    if name == "fog":
        steps = [
            A.RandomFog(fog_coef_range=_fixed(v["fog_coef"]), alpha_coef=0.08, p=1),
            A.RandomBrightnessContrast(
                brightness_limit=_fixed(v["brightness"]),
                contrast_limit=_fixed(v["contrast"]),
                p=1,
            ),
        ]
    elif name == "night":
        steps = [
            A.RandomGamma(gamma_limit=_fixed(v["gamma"]), p=1),
            A.RandomBrightnessContrast(
                brightness_limit=(0, 0), contrast_limit=_fixed(v["contrast"]), p=1
            ),
            A.ISONoise(color_shift=(0.01, 0.01), intensity=_fixed(v["iso_intensity"]), p=1),
        ]
    elif name == "rain":
        steps = [
            A.RandomRain(
                rain_type=v["rain_type"],
                slant_range=(-10, 10),
                drop_width=1,
                drop_color=(200, 200, 200),
                blur_value=v["blur"],
                brightness_coefficient=v["brightness_coefficient"],
                p=1,
            )
        ]
    elif name == "snow":
        steps = [
            A.RandomSnow(
                method="bleach",
                snow_point_range=_fixed(v["snow_point"]),
                brightness_coeff=v["brightness_coeff"],
                p=1,
            ),
            A.RandomRain(
                rain_type=v["flakes"],
                slant_range=(-3, 3),
                drop_length=1,
                drop_width=3,
                drop_color=(255, 255, 255),
                blur_value=3,
                brightness_coefficient=1.0,
                p=1,
            ),
        ]
    elif name == "motion_blur":
        steps = [
            A.MotionBlur(
                blur_limit=_fixed(v["kernel"]),
                allow_shifted=False,
                angle_range=(0, 360),
                direction_range=(-1.0, 1.0),
                p=1,
            )
        ]
    else:  # glare
        steps = [
            A.RandomSunFlare(
                flare_roi=(0, 0, 1, 0.5),
                src_radius=v["src_radius"],
                num_flare_circles_range=(6, 10),
                method="physics_based",
                p=1,
            )
        ]
    return A.Compose(steps, p=1)


@dataclass(frozen=True)
class CorruptionSpec:
    """One corruption at one severity; ``label`` (``fog3``) names its output sub-folder."""

    name: str
    severity: int

    @property
    def label(self) -> str:
        return f"{self.name}{self.severity}"


def parse_corruption(text: str) -> CorruptionSpec:
    """``"fog:3"`` -> ``CorruptionSpec("fog", 3)``; one-line errors for bad names or severities."""
    name, sep, level = str(text).partition(":")
    name = name.strip()
    if name not in SEVERITY_TABLE:
        raise ConfigError(f"unknown corruption {name!r}; known corruptions: {', '.join(KNOWN)}")
    if not sep:
        raise ConfigError(f"corruption {text!r} has no severity; write it as {name}:1 .. {name}:5")
    try:
        severity = int(level)
    except ValueError:
        severity = 0
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption {text!r}: severity must be an integer 1-5, e.g. {name}:3")
    return CorruptionSpec(name, severity)


def _specs(corruptions: Sequence[str | CorruptionSpec]) -> list[CorruptionSpec]:
    specs = [c if isinstance(c, CorruptionSpec) else parse_corruption(c) for c in corruptions]
    if not specs:
        raise ConfigError(
            f"no corruption given; pass at least one NAME:SEVERITY (known: {', '.join(KNOWN)})"
        )
    labels = [s.label for s in specs]
    repeated = next((lab for lab in labels if labels.count(lab) > 1), None)
    if repeated:
        raise ConfigError(f"corruption {repeated} is listed twice; list each one once")
    return specs


def frame_seed(seed: int, label: str, frame: str) -> int:
    """The seed of one frame's random draws, from the run seed, corruption label and frame path."""
    digest = hashlib.sha256(f"{seed}:{label}:{frame}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def mixed_assignment(frames: Sequence[str], labels: Sequence[str], seed: int) -> dict[str, str]:
    """Each frame's corruption: round-robin over a seeded permutation (counts differ by <= 1)."""
    order = np.random.default_rng(seed).permutation(len(frames))
    chosen = {int(j): labels[i % len(labels)] for i, j in enumerate(order)}
    return {frame: chosen[i] for i, frame in enumerate(frames)}


def _check_paths(src: Path, out: Path) -> None:
    a, b = src.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ConfigError(
            f"{out}: the output folder must be outside the source {src} (and not contain it); "
            "choose another --out"
        )


def _settings(src, format, split, options, seed, mix, specs, frames, A) -> dict[str, Any]:
    settings = {
        "source": str(Path(src).resolve()),
        "frames_sha256": hashlib.sha256("\n".join(frames).encode()).hexdigest(),
        "format": format,
        "split": split,
        "options": {k: str(v) for k, v in sorted(options.items())},
        "seed": seed,
        "mode": "mixed" if mix else "per-corruption",
        "library": "albumentations",
        "library_version": A.__version__,
        "jpeg_quality": JPEG_QUALITY,
        "corruptions": [
            {
                "name": s.name,
                "severity": s.severity,
                "label": s.label,
                "description": DESCRIPTIONS[s.name],
                "transform": A.to_dict(build_transform(s.name, s.severity))["transform"],
            }
            for s in specs
        ],
    }
    # As it reads back from the manifest (tuples become lists), so that runs compare equal.
    return json.loads(json.dumps(settings))


def _claim_output(out: Path, settings: dict[str, Any]) -> None:
    """Refuse a non-empty ``out`` unless an earlier run with the same settings made it."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise DataError(
            f"{out}: folder is not empty and has no {MANIFEST} from `pivotseg data corrupt`; "
            "choose a new or empty --out folder"
        )
    try:
        previous = json.loads(manifest.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{manifest}: unreadable; choose a new --out folder or delete {out} to redo it"
        ) from None
    differing = [k for k in settings if previous.get(k) != settings[k]]
    if differing:
        key = differing[0]
        raise DataError(
            f"{out}: made with different settings ({key}: {previous.get(key)!r} there, "
            f"{settings[key]!r} now); use a new --out folder or delete {out} to redo it"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(part, path)


def _save_image(image: np.ndarray, path: Path) -> None:
    suffix = path.suffix.lower()
    options: dict[str, Any] = {}
    if suffix in (".jpg", ".jpeg"):
        options = {"quality": JPEG_QUALITY, "subsampling": 0}
    elif suffix == ".webp":
        options = {"lossless": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under another name then renamed, so an interrupted run never leaves a partial
    # image that a resumed run would take as done.
    part = path.with_name(path.name + ".part")
    Image.fromarray(image).save(part, format=Image.registered_extensions()[suffix], **options)
    os.replace(part, path)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    shutil.copyfile(src, part)
    os.replace(part, dst)


def corrupt_dataset(
    src: str | Path,
    format: str,
    out: str | Path,
    corruptions: Sequence[str | CorruptionSpec],
    seed: int = 0,
    split: str | None = None,
    mix: bool = False,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Write adverse-condition copies of a dataset folder; return the manifest.

    Args:
        src: the dataset folder (never written to).
        format: its format (a key of :data:`~pivotseg.data.formats.FORMATS`); the output reads
            with the same format and ``split``.
        out: the output folder: new, empty, or an unfinished run with the same settings
            (resumed: files already written are kept).
        corruptions: ``"NAME:SEVERITY"`` strings (names: :data:`KNOWN`, severities 1-5).
        seed: the seed of every random draw (per frame, see :func:`frame_seed`) and of the
            mixed assignment.
        split: one split to corrupt (default: every split).
        mix: one copy in ``out`` where each frame gets one corruption, instead of one copy per
            corruption in ``out/<name><severity>``.
        progress: show a tqdm bar.
        **options: format options (folder ``mapping``, acdc ``condition``, ...).

    Raises:
        ConfigError: unknown corruption, bad severity, output inside the source, or
            albumentations missing.
        DataError: unreadable source, or ``out`` holds other data or other settings.
    """
    specs = _specs(corruptions)
    src, out = Path(src), Path(out)
    _check_paths(src, out)
    A = _albumentations()
    dataset = build_dataset(src, format, split, **options)
    samples = sorted(dataset.samples, key=lambda s: s.image.relative_to(src).as_posix())
    frames = [s.image.relative_to(src).as_posix() for s in samples]

    settings = _settings(src, format, split, options, seed, mix, specs, frames, A)
    _claim_output(out, settings)
    labels = [s.label for s in specs]
    manifest: dict[str, Any] = {"settings": settings, "complete": False, "frames": len(frames)}
    if mix:
        assignment = mixed_assignment(frames, labels, seed)
        manifest["roots"] = {"mixed": "."}
        counts = Counter(assignment.values())
        manifest["counts"] = {label: counts[label] for label in labels}
        manifest["assignment"] = assignment
        jobs = [(out, assignment[f], f, sample) for f, sample in zip(frames, samples)]
    else:
        manifest["roots"] = {label: label for label in labels}
        jobs = [(out / lab, lab, f, sample) for lab in labels for f, sample in zip(frames, samples)]
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MANIFEST, manifest)

    transforms = {s.label: build_transform(s.name, s.severity) for s in specs}
    for root, label, frame, sample in tqdm(jobs, desc="corrupting", disable=not progress):
        label_out = root / sample.label.relative_to(src)
        if not label_out.exists():
            _copy_file(sample.label, label_out)
        if (root / frame).exists():
            continue
        transform = transforms[label]
        transform.set_random_seed(frame_seed(seed, label, frame))
        _save_image(transform(image=read_image(sample.image))["image"], root / frame)

    roots = sorted({job[0] for job in jobs})
    for root in roots:
        for name in MAPPING_FILES:  # the folder format reads its classes from the root
            if (src / name).is_file() and not (root / name).exists():
                _copy_file(src / name, root / name)
        _check_readable(root, format, split, options, len(frames))
    manifest["complete"] = True
    _write_json(out / MANIFEST, manifest)
    return manifest


def _check_readable(root: Path, format: str, split, options, expected: int) -> None:
    _, listing = scan_format(root, format, split, **options)
    if len(listing.pairs) != expected or listing.unpaired_images or listing.unpaired_labels:
        raise DataError(
            f"{root}: wrote {expected} pairs but the {format} reader finds {len(listing.pairs)}; "
            f"this layout does not survive a copy by relative paths, please report it"
        )
