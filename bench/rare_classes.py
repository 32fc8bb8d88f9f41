"""Rare classes on the CPU DG protocol: per-class source-val IoU under sampling and budget choices.

    python bench/rare_classes.py [--out runs/rcs] [--write]
    python bench/rare_classes.py --rows LABEL ... [--seeds 0 1 2] [--methods frozen full dpft]

Each row is configs/bench_dg_tinyvit_camvid.yaml with its data and budget settings stated in
full (so a row means the same thing whatever the config's defaults become), trained with
``data.targets=[]``: only the source val split is evaluated, and nothing here looks at a target.
Each run is a ``pivotseg train`` child process; finished ones are found again in --out and
skipped. Without --rows it runs the plan (:data:`PLAN`: the rows tried on seed 0, the chosen
one on three seeds) and prints the table (mIoU and per-class IoU on source val, mean over
seeds); --write puts it into the "rare classes" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.config import load_config
from pivotseg.data import CAMVID_CLASSES, build_dataset
from pivotseg.data.rare_classes import class_pixel_counts, median_frequency_weights
from pivotseg.engine import read_metrics

ROOT = check_checkout(__file__)

CONFIG = ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"
# DAFormer's min_pixels (3000 on 1914x1052 GTA5 labels) scaled to CamVid's 480x360 labels.
RCS = "{temperature: 0.01, min_pixels: 250}"


def budget(
    iterations: int = 200,
    batch: int = 2,
    crop: int = 384,
    scales: str = "[360, 432, 504, 576]",
    rcs: str = "null",
    eval_short: str = "null",
) -> list[str]:
    """Every setting the rows vary, written out (warm-up: a tenth of the iterations)."""
    return [
        f"train.iterations={iterations}",
        f"train.warmup_iters={iterations // 10}",
        f"train.global_batch_size={batch}",
        f"data.crop_size={crop}",
        f"data.scales={scales}",
        f"data.rare_class_sampling={rcs}",
        f"data.eval_resize_short={eval_short}",
    ]


def class_weights(power: float) -> list[str]:
    """Median-frequency loss weights (to ``power``) of the config's source set, as an override."""
    cfg = load_config(CONFIG)
    source = cfg.data.source
    dataset = build_dataset(source.path, source.format, source.split, source.domain)
    weights = median_frequency_weights(class_pixel_counts(dataset), power)
    return [f"model.head_args.ce_class_weights={weights}"]


NO_WEIGHTS = ["model.head_args.ce_class_weights=null"]
MEDIAN, SQRT_MEDIAN = class_weights(1.0), class_weights(0.5)
ROWS: dict[str, list[str]] = {
    "baseline (200 it, batch 2, 384)": budget() + NO_WEIGHTS,
    "+RCS": budget(rcs=RCS) + NO_WEIGHTS,
    "+RCS, 400 it": budget(iterations=400, rcs=RCS) + NO_WEIGHTS,
    "median-frequency CE": budget() + MEDIAN,
    "+RCS, median-frequency CE": budget(rcs=RCS) + MEDIAN,
    "+RCS, sqrt median-frequency CE": budget(rcs=RCS) + SQRT_MEDIAN,
    "+RCS, median-frequency CE, 400 it": budget(iterations=400, rcs=RCS) + MEDIAN,
    "+RCS, median-frequency^0.75 CE": budget(rcs=RCS) + class_weights(0.75),
    "+RCS, median-frequency^0.75 CE, 300 it": budget(iterations=300, rcs=RCS) + class_weights(0.75),
}
CHOSEN = "+RCS, median-frequency^0.75 CE, 300 it"
# What the docs table holds: (row, methods, seeds), in the order they were tried; rows were
# compared on seed 0, the chosen one confirmed on seeds 1 and 2.
PLAN: list[tuple[str, list[str], list[int]]] = [
    ("baseline (200 it, batch 2, 384)", ["frozen", "full"], [0]),
    ("+RCS", ["frozen", "full"], [0]),
    ("+RCS, 400 it", ["frozen"], [0]),
    ("median-frequency CE", ["frozen"], [0]),
    ("+RCS, median-frequency CE", ["frozen", "full", "dpft"], [0]),
    ("+RCS, sqrt median-frequency CE", ["frozen"], [0]),
    ("+RCS, median-frequency CE, 400 it", ["frozen"], [0]),
    ("+RCS, median-frequency^0.75 CE", ["frozen"], [0]),
    (CHOSEN, ["frozen", "full"], [0, 1, 2]),
    (CHOSEN, ["dpft"], [0]),
]
# Evaluate once, at the end, and keep one checkpoint: the rows differ in length.
COMMON = ["data.targets=[]", "train.eval_every=0", "train.checkpoint_every=0"]


def _slug(label: str) -> str:
    text = label.replace("+", "plus ")
    return re.sub("_+", "_", "".join(c if c.isalnum() else "_" for c in text)).strip("_")


def _finished(run_dir: Path) -> bool:
    """The run evaluated at its last iteration (an earlier run of this script)."""
    if not (run_dir / "metrics.jsonl").is_file():
        return False
    records = read_metrics(run_dir)
    last_iter = max((r["iter"] for r in records if "loss" in r), default=-1)
    return any("eval" in r and r["iter"] == last_iter for r in records)


def run_row(label: str, methods: list[str], seeds: list[int], out: Path) -> list[dict]:
    """Train (or find again in ``out``) every method x seed of a row; their source-val results."""
    runs = []
    for method in methods:
        for seed in seeds:
            folder = out / _slug(label) / method / f"seed{seed}"
            print(f"rare classes: {label}, {method}, seed {seed}", flush=True)
            if not _finished(folder):
                command = [sys.executable, "-m", "pivotseg", "train"]
                if (folder / "checkpoints" / "last").is_dir():
                    # This script's own interrupted run: continue it (the run lock refuses a
                    # folder another process is training in).
                    command += ["--resume", str(folder)]
                else:
                    setting = [f"model.method={method}", "model.method_args={}", f"seed={seed}"]
                    command += [str(CONFIG), *COMMON, *ROWS[label], *setting, f"run_dir={folder}"]
                    if folder.exists():  # replaces only run files, never a user's notes
                        command.append("--overwrite")
                subprocess.run(command, check=True)
            records = read_metrics(folder)
            last = [r["eval"] for r in records if "eval" in r][-1]
            speeds = [r["sec_per_iter"] for r in records if "sec_per_iter" in r]
            # from the config being written to the last record: training plus evaluation
            start, end = (folder / name for name in ("config.yaml", "metrics.jsonl"))
            wall = end.stat().st_mtime - start.stat().st_mtime
            runs.append(
                dict(
                    row=label,
                    method=method,
                    seed=seed,
                    miou=last["val"]["miou"],
                    iou=last["val"]["iou"],
                    sec_per_iter=statistics.fmean(speeds[1:] or speeds),  # 1st: start-up
                    minutes=wall / 60,
                )
            )
    return runs


def table(runs: list[dict]) -> str:
    header = ["row", "method", "seeds", "source val mIoU", *CAMVID_CLASSES, "at 0", "s/iter"]
    header.append("min/run")
    rows = []
    for label in dict.fromkeys(r["row"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs if r["row"] == label):
            group = [r for r in runs if r["row"] == label and r["method"] == method]
            mious = [r["miou"] for r in group]
            spread = statistics.stdev(mious) if len(mious) > 1 else 0.0
            per_class = [statistics.fmean(r["iou"][k] for r in group) for k in range(11)]
            zero = sum(1 for v in per_class if not math.isnan(v) and v < 0.05)
            rows.append(
                [
                    label,
                    method,
                    ",".join(str(r["seed"]) for r in group),
                    f"{statistics.fmean(mious):.1f} ± {spread:.1f}",
                    *(f"{v:.1f}" for v in per_class),
                    zero,
                    f"{statistics.fmean(r['sec_per_iter'] for r in group):.2f}",
                    f"{statistics.fmean(r['minutes'] for r in group):.1f}",
                ]
            )
    return markdown_table(header, rows)


def lowest(runs: list[dict]) -> str:
    """The worst class of any single run of the chosen row (the means above hide seeds)."""
    chosen = [r for r in runs if r["row"] == CHOSEN]
    worst = min(chosen, key=lambda r: min(r["iou"]))
    k = min(range(len(worst["iou"])), key=lambda i: worst["iou"][i])
    return (
        f"Lowest class IoU in any single run of '{CHOSEN}': {worst['iou'][k]:.1f} "
        f"({CAMVID_CLASSES[k]}, {worst['method']}, seed {worst['seed']})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rcs"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: the plan")
    parser.add_argument("--seeds", nargs="+", type=int, help="with --rows (default 0)")
    parser.add_argument("--methods", nargs="+", help="with --rows (default frozen full)")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    args = parser.parse_args()
    plan = PLAN
    if args.rows:
        plan = [(row, args.methods or ["frozen", "full"], args.seeds or [0]) for row in args.rows]
    runs = [r for row, methods, seeds in plan for r in run_row(row, methods, seeds, args.out)]
    text = table(runs)
    print(text)
    if args.write:
        if plan is not PLAN:
            raise SystemExit("--write documents the plan: run it without --rows")
        write_section(
            "rare_classes",
            "Rare classes on the CPU DG protocol (source val only)",
            "python bench/rare_classes.py --write",
            "\n\n".join([PROTOCOL, text, lowest(runs), NOTES]),
        )


PROTOCOL = (
    "configs/bench_dg_tinyvit_camvid.yaml trained with `data.targets=[]`: CamVid day train "
    "(305 frames) scored on its val split (101 frames, 480x360, whole-image inference) only; "
    "no target was evaluated for any row. Each row states its budget in full (bench/"
    "rare_classes.py). RCS: rare-class sampling (DAFormer), `data.rare_class_sampling: "
    f"{RCS}` (docs/training.md). Per-class IoU: mean over the seeds listed; 'at 0': classes "
    "below 0.05 IoU. s/iter and min/run (training plus source-val evaluation) were measured "
    "with one thread per run (OMP_NUM_THREADS=1) while other work shared the 2 cores: they "
    "compare nothing."
)
NOTES = f"""\
What the rows show (source val only):

- **Without a class-weighted loss no row learns the five small classes** (Pole, SignSymbol,
  Fence, Pedestrian, Bicyclist), with or without rare-class sampling and at 400 iterations.
  RCS alone raises mIoU through Pavement and Car but not them: on CamVid day they are in almost
  every frame (Pole in 304 of 305), so drawing a frame for them changes little, and a crop
  anchored on a pole still has it on 1-2% of its pixels, which the plain cross-entropy ignores.
- **Median-frequency class weights** (SegNet's CamVid recipe; `model.head_args.ce_class_weights`
  from `median_frequency_weights`, docs/training.md) learn every class; on seed 0 RCS adds to
  them (Fence, Bicyclist). The full weights cost Building (weight 0.2), the square root loses
  SignSymbol again; the power 0.75 keeps both.
- **Budget.** 400 iterations improve on 200; 300 were kept so that the protocol's five methods
  x three seeds fit 90 minutes on 2 cores (its measured time: the 'dg' section).

Chosen, and now the default of configs/bench_dg_tinyvit_camvid.yaml: **{CHOSEN}** (RCS
`{RCS}`, median-frequency weights to the power 0.75, 300 iterations, warm-up 30, batch 2, 384
crops), confirmed on seeds 0-2 for frozen and full. Its source val is above the ~49 mIoU
of a linear probe on the frozen encoder at 1024 input (../shared/README.md; day test split, not
this val split). The 'dg' section above runs this default and prints the protocol's time,
read from its run folders. Neither RCS nor the weights cost time per iteration.
"""

if __name__ == "__main__":
    main()
