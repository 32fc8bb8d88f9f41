"""Test-time augmentation against single-scale inference, on trained runs.

    python bench/tta.py --run 'dpft=RUNS/dpft/seed{seed}' --seeds 0 1 2 \
        [--targets idd_lite seq05vd_adverse] [--limit 50] [--json FILE] [--doc]

Each run is scored on its own ``data.targets`` (those named by ``--targets``) and its source
val (or those of ``--datasets-from CONFIG`` for every run), once with one view (the default) and once per ``--variant`` (``NAME:s1,s2[:flip]``; default
mmseg's common ``0.75,1,1.25`` with flip), ``--limit`` evenly spaced frames per dataset, in the
same process one after the other. Reported: mIoU per dataset and their paired difference over
seeds (95 % Student-t), and seconds per frame as the ratio to single-scale on the same frames.
A measurement, not a setting: the default stays one view.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.config import EvalConfig, load_config
from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
from pivotseg.evaluation.paired import paired_difference
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.dgss.evaluate import evaluate_datasets, open_eval_datasets

if __package__:
    from bench.adapt import load_or_run
else:  # run as a script, bench/ is sys.path[0]
    from adapt import load_or_run

ROOT = check_checkout(__file__)
PLAIN = "single scale"
TITLE = "Test-time augmentation against single scale (CPU)"


def parse_variant(text: str) -> tuple[str, list[float], bool]:
    """``NAME:0.75,1,1.25[:flip]`` -> ``(NAME, scales, flip)``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "flip"):
        raise SystemExit(f"--variant {text!r}: give NAME:S1,S2,...[:flip]")
    return parts[0], [float(s) for s in parts[1].split(",")], len(parts) == 3


def run_rows(args, result: dict) -> None:
    """Score every (run, seed, variant) not yet in ``result``, writing ``--json`` as it goes."""
    result["limit"] = args.limit
    done = {(r["run"], r["seed"], r["variant"]) for r in result["rows"]}
    variants = [(PLAIN, [1.0], False)] + [parse_variant(v) for v in args.variant]
    shared = load_config(args.datasets_from) if args.datasets_from else None
    for seed in args.seeds:
        for name, pattern in (spec.split("=", 1) for spec in args.run):
            todo = [v for v in variants if (name, seed, v[0]) not in done]
            if not todo:  # resumed: neither the model nor the data is opened again
                continue
            folder = resolve_model_folder(pattern.format(seed=seed))
            cfg = shared or find_run_config(folder)
            specs = [t for t in cfg.data.targets if t.label in args.targets]
            datasets = open_eval_datasets([cfg.data.val, *specs], cfg.data.eval_resize_short)
            model = load_segmenter(folder)
            for variant, scales, flip in todo:
                eval_cfg = EvalConfig(limit=args.limit, tta_scales=scales, tta_flip=flip)
                start = time.perf_counter()
                record = evaluate_datasets(model, datasets, eval_cfg, val_name=cfg.data.val.label)
                seconds = time.perf_counter() - start
                frames = sum(r["frames"] for r in [record["val"], *record["targets"].values()])
                row = {"run": name, "seed": seed, "variant": variant, "scales": scales,
                       "flip": flip, "s_per_frame": seconds / frames,
                       "miou": {"source val": record["val"]["miou"],
                                **{k: v["miou"] for k, v in record["targets"].items()}}}  # fmt: skip
                result["rows"].append(row)
                print(row, flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(result, indent=2))


def report(result: dict) -> str:
    rows = result["rows"]
    datasets = list(dict.fromkeys(k for r in rows for k in r["miou"]))
    table = markdown_table(
        ["run", "seed", "inference", *datasets, "s/frame"],
        [[r["run"], r["seed"], r["variant"],
          *(f"{r['miou'][d]:.2f}" if d in r["miou"] else "" for d in datasets),
          f"{r['s_per_frame']:.2f}"]
         for r in sorted(rows, key=lambda r: (r["run"], r["seed"], r["variant"] != PLAIN))],
    )  # fmt: skip

    def by_seed(run, variant, key):
        return {r["seed"]: key(r) for r in rows if r["run"] == run and r["variant"] == variant}

    paired = []
    for run, variant in dict.fromkeys((r["run"], r["variant"]) for r in rows):
        if variant == PLAIN:
            continue
        cells = [
            paired_difference(
                by_seed(run, variant, lambda r, d=d: r["miou"].get(d)),
                by_seed(run, PLAIN, lambda r, d=d: r["miou"].get(d)),
            ).summary()
            for d in datasets
        ]
        plain_time = by_seed(run, PLAIN, lambda r: r["s_per_frame"])
        ratios = [
            t / plain_time[s] for s, t in by_seed(run, variant, lambda r: r["s_per_frame"]).items()
        ]
        paired.append([f"{run} {variant} − {PLAIN}", *cells, f"{sum(ratios) / len(ratios):.1f}x"])
    paired_table = markdown_table(
        ["comparison", *(f"{d} Δ mIoU [95 % CI]" for d in datasets), "time"], paired
    )
    return (
        f"Trained runs scored with one view and with test-time augmentation (`eval.tta_scales`, "
        f"`eval.tta_flip`), at most {result['limit']} evenly spaced frames per dataset, whole "
        "images at each run's evaluation size; s/frame: wall time of the whole evaluation over "
        "the frames scored, both settings one after the other in one process. A measurement, "
        f"not a setting: the default stays one view.\n\n{table}\n\nPaired by seed "
        f"(95 % Student-t; time: ratio to single scale, mean over seeds):\n\n{paired_table}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", nargs="+", default=["idd_lite", "seq05vd_adverse"])
    parser.add_argument(
        "--datasets-from",
        metavar="CONFIG",
        help="score every run on this config's data.val and data.targets (default: each run's)",
    )
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:S1,S2[:flip]")
    parser.add_argument("--limit", type=int, default=50, help="frames per dataset (default 50)")
    parser.add_argument("--json", metavar="FILE", help="rows as they finish; a rerun resumes")
    parser.add_argument("--from-json", metavar="FILE", help="report a --json file; run nothing")
    parser.add_argument("--doc", action="store_true", help="write the docs section")
    args = parser.parse_args(argv)
    args.variant = args.variant or ["0.75/1/1.25 + flip:0.75,1,1.25:flip"]
    result = load_or_run(parser, args, "bench/tta.py", argv, run_rows)
    text = report(result)
    print(text)
    if args.doc:
        write_section("tta", TITLE, result["command"], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
