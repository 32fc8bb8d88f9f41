"""The source-side proxy target of the adaptation benchmarks (bench/adapt_proxy.py,
bench/pivot_classifier.py): CamVid day val, each frame under one corruption none of the real
targets uses, split in time into an adaptation half and a scored half."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from pivotseg.data import build_dataset
from pivotseg.data.io import read_image
from pivotseg.paths import shared_path

CORRUPTIONS = ("jpeg", "noise", "colour", "lowres")


def proxy_transform(name: str):
    """The albumentations pipeline of one proxy corruption (always applied)."""
    import albumentations as A

    steps = {
        "jpeg": [A.ImageCompression(quality_range=(8, 8), p=1)],
        "noise": [A.GaussNoise(std_range=(0.12, 0.12), p=1)],
        "colour": [
            A.HueSaturationValue(
                hue_shift_limit=(25, 25), sat_shift_limit=(-50, -50), val_shift_limit=(0, 0), p=1
            ),
            A.RGBShift(r_shift_limit=(40, 40), g_shift_limit=(0, 0), b_shift_limit=(-40, -40), p=1),
        ],
        "lowres": [A.Downscale(scale_range=(0.3, 0.3), p=1)],
    }[name]
    return A.Compose(steps, p=1)


def proxy_images(out: Path, seed: int = 0) -> tuple[list, list, Path]:
    """``(adapt samples, score samples, folder of corrupted images)``: CamVid day val in time
    order, split in half; each frame corrupted once (round-robin over a seeded permutation)."""
    from PIL import Image

    val = build_dataset(shared_path("data", "camvid_day"), "camvid", "val")
    samples = sorted(val.samples, key=lambda s: s.image.name)
    folder = out / "proxy_images"
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(samples))
    assignment = {int(j): CORRUPTIONS[i % len(CORRUPTIONS)] for i, j in enumerate(order)}
    corrupted = []
    for i, sample in enumerate(samples):
        path = folder / f"{sample.image.stem}.png"
        if not path.is_file():
            transform = proxy_transform(assignment[i])
            transform.set_random_seed(seed * 100_003 + i)
            image = transform(image=read_image(sample.image))["image"]
            Image.fromarray(image).save(path)
        corrupted.append(replace(sample, image=path))
    half = len(samples) // 2
    return corrupted[:half], (samples[half:], corrupted[half:]), folder
