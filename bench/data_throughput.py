"""Images/s through reading + the DGSS training augmentation, by DataLoader worker count.

Reads CamVid day train (../shared/data/camvid_day) through ``train_transforms(512)`` (random
short-edge resize 256-1024, 512 crop with cat_max_ratio, flip, photometric distortion, pad,
to-tensor), with ``num_workers`` 0, 1 and 2 side by side in one run. The first batch of each
loader (worker start-up) is not timed.

    python bench/data_throughput.py [--images 48] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.data import ToTensor, build_dataset, collate, seed_worker, train_transforms
from pivotseg.paths import shared_path

check_checkout(__file__)


def measure(dataset, workers: int, images: int, batch_size: int) -> float:
    """Images per second over ``images`` samples after one untimed warm-up batch."""
    subset = torch.utils.data.Subset(dataset, range(min(len(dataset), images + batch_size)))
    loader = torch.utils.data.DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
    )
    it = iter(loader)
    next(it)
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="timed images per setting")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    root = shared_path("data", "camvid_day")
    if not root.exists():
        sys.exit(f"{root} is absent (set PIVOTSEG_SHARED)")
    torch.set_num_threads(1)
    augmented = build_dataset(root, "camvid", "train", transform=train_transforms(512, seed=0))
    read_only = build_dataset(root, "camvid", "train", transform=ToTensor())
    rows = []
    base = None
    for name, dataset, workers in (
        ("read only (decode + to-tensor)", read_only, 0),
        ("read + train augment", augmented, 0),
        ("read + train augment", augmented, 1),
        ("read + train augment", augmented, 2),
    ):
        rate = measure(dataset, workers, args.images, args.batch_size)
        if name.startswith("read +"):
            base = base or rate
        ratio = f"{rate / base:.2f}x" if base else "-"
        rows.append([name, workers, f"{rate:.1f}", ratio])
        print(f"{name}, num_workers={workers}: {rate:.1f} images/s")
    body = (
        f"CamVid day train (480x360 JPEG) through `train_transforms(512)` (random short edge "
        f"256-1024, 512 crop with cat_max_ratio 0.75, flip, photometric distortion, pad), "
        f"batch {args.batch_size}, {args.images} timed images per setting after one untimed "
        "warm-up batch, torch threads 1. The first row reads without augmenting, for scale.\n\n"
        + markdown_table(["pipeline", "num_workers", "images/s", "vs augment at 0 workers"], rows)
        + "\n\nThe machine's 2 cores are shared with other jobs, so extra workers cannot scale "
        "linearly here."
    )
    command = (
        f"python bench/data_throughput.py --images {args.images} --batch-size {args.batch_size}"
    )
    print(write_section("data_throughput", "Data loading throughput", command, body))


if __name__ == "__main__":
    main()
