"""Test-time adaptation check: source-only against adapted, on held-out frames of the target.

    python bench/adapt.py --run dpft=runs/adapt_src [--run rein=runs/rein_src ...] \
        [--target idd|camvid] [--steps N] [--methods spl tent] [--out runs/bench_adapt] \
        [--json FILE] [--doc]
    python bench/adapt.py --from-json FILE --doc     # re-render a finished run's section

Each run is adapted with every adaptation its tuning method allows (``tent`` always,
``selftrain`` when the method declares adaptable parameters, ``spl`` for DPFT) on the same
images and budget, and scored with the source-only model beside it on:

* the held-out part of the target: IDD Lite split by sequence (sorted sequence ids, every
  other sequence adapts, the rest is scored; ``--target idd``), or CamVid Seq05VD split in time
  (first half of the frames adapts, second half is scored; ``--target camvid``);
* the source validation split (CamVid day val, one frame in ``--val-every``), to see what
  adaptation costs at home.

``--doc`` writes the table into the "adapt" section of docs/benchmarks.md.

Adaptation reads only the images of its half (no label); labels are read only for scoring.
The hyperparameters are :class:`~pivotseg.tasks.adapt.AdaptSettings`' defaults, chosen on
source-side reasoning before any target number was seen; this script is for checking that
adaptation does not collapse, not for tuning it (do not pick settings on its target numbers).
IDD frames are resized to a 360-pixel short side, the size of the source frames, as bench dg
resizes its other targets.

Source runs come from e.g.::

    pivotseg train configs/bench_dg_tinyvit_camvid.yaml run_dir=runs/adapt_src \
        data.targets=[] train.iterations=200                    # dpft, the config's method
    pivotseg train configs/bench_dg_tinyvit_camvid.yaml run_dir=runs/adapt_src_rein \
        model.method=rein data.targets=[] train.iterations=200
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, markdown_table, write_section  # noqa: E402
from pivotseg.config import EvalConfig  # noqa: E402
from pivotseg.data import build_dataset  # noqa: E402
from pivotseg.data.transforms import eval_transforms  # noqa: E402
from pivotseg.engine.checkpoint import resolve_model_folder  # noqa: E402
from pivotseg.paths import shared_path  # noqa: E402
from pivotseg.segmenter import load_segmenter  # noqa: E402
from pivotseg.tasks.adapt import adapt_run, resolve_method  # noqa: E402
from pivotseg.tasks.dgss.evaluate import evaluate_datasets  # noqa: E402

SOURCE_SHORT = 360  # CamVid day frames are 480x360


def target_halves(target: str):
    """``(images to adapt on, dataset to score, resize_short)`` of the target."""
    if target == "idd":
        root = shared_path("data", "idd_lite")
        short = SOURCE_SHORT
        full = build_dataset(root, "idd_lite", "val", transform=eval_transforms(short))
        sequences = sorted({s.domain for s in full.samples}, key=lambda d: (len(d), d))
        adapt_seqs = set(sequences[0::2])
        adapt = [s for s in full.samples if s.domain in adapt_seqs]
        score = [s for s in full.samples if s.domain not in adapt_seqs]
    else:
        root = shared_path("data", "camvid_day")
        short = None
        full = build_dataset(root, "camvid", "test", transform=eval_transforms(None))
        ordered = sorted(full.samples, key=lambda s: s.image.name)
        adapt, score = ordered[: len(ordered) // 2], ordered[len(ordered) // 2 :]
    full.samples = score
    return [s.image for s in adapt], full, short


def score(model, datasets) -> dict:
    record = evaluate_datasets(model, datasets, EvalConfig(mode="whole"), val_name="source_val")
    return {"target": record["targets"]["target"]["miou"], "source_val": record["val"]["miou"]}


def adaptations_of(model, only: list[str] | None) -> list[str]:
    """Every adaptation the run's tuning method allows (strongest first), optionally filtered."""
    strongest = resolve_method(model, "auto")
    allowed = {"spl": ["spl", "selftrain", "tent"], "selftrain": ["selftrain", "tent"]}
    return [m for m in allowed.get(strongest, ["tent"]) if only is None or m in only]


def run_rows(args) -> dict:
    images, target_set, short = target_halves(args.target)
    val = build_dataset(
        shared_path("data", "camvid_day"), "camvid", "val", transform=eval_transforms()
    )
    val.samples = val.samples[:: args.val_every]  # a check that home is kept, not a headline
    datasets = {"target": target_set, "source_val": val}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"target {args.target}: adapt on {len(images)} frames, score {len(target_set)} frames")
    rows = []
    for spec in args.run:
        name, run = spec.split("=", 1)
        model = load_segmenter(resolve_model_folder(run))
        rows.append({"run": name, "adaptation": "source only", **score(model, datasets)})
        print(rows[-1], flush=True)
        for method in adaptations_of(model, args.methods):
            folder = out / f"{name}_{method}"
            shutil.rmtree(folder, ignore_errors=True)
            start = time.time()
            adapt_run(
                run, images, folder, method=method, steps=args.steps, resize_short=short,
                progress=False,
            )  # fmt: skip
            seconds = time.time() - start
            summary = json.loads((folder / "adapt.json").read_text())
            adapted = load_segmenter(resolve_model_folder(folder))
            rows.append(
                {
                    "run": name,
                    "adaptation": method,
                    **score(adapted, datasets),
                    "steps": summary["settings"]["steps"],
                    "resets": summary["resets"],
                    "adapted_params": summary["adapted_parameter_count"],
                    "minutes": round(seconds / 60, 1),
                }
            )
            print(rows[-1], flush=True)
    return {
        "target": args.target,
        "adapt_frames": len(images),
        "score_frames": len(target_set),
        "val_frames": len(val),
        "val_every": args.val_every,
        "command": "python bench/adapt.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "rows": rows,
    }


def report(result: dict) -> str:
    """The markdown of the "adapt" section of docs/benchmarks.md."""
    target = {
        "idd": "IDD Lite val split by sequence (every other sequence adapts, the rest is "
        "scored; frames resized to the source's 360-pixel short side; mIoU on IDD's 7 level-1 "
        "classes through the CamVid -> IDD class map)",
        "camvid": "CamVid Seq05VD split in time (first half adapts, second half is scored)",
    }[result["target"]]
    table = markdown_table(
        ["run", "adaptation", "target held-out mIoU", "source val mIoU", "steps", "resets",
         "adapted params", "adapt min"],
        [
            [r["run"], r["adaptation"], f"{r['target']:.2f}", f"{r['source_val']:.2f}",
             r.get("steps", ""), r.get("resets", ""), r.get("adapted_params", ""),
             r.get("minutes", "")]
            for r in result["rows"]
        ],
    )  # fmt: skip
    return (
        "Source runs: `pivotseg train configs/bench_dg_tinyvit_camvid.yaml model.method=METHOD "
        "data.targets=[] train.iterations=200` (CamVid day, seed 0). "
        f"Target: {target}; {result['adapt_frames']} unlabelled frames to adapt on, "
        f"{result['score_frames']} held-out frames scored (whole image), and a "
        f"{result['val_frames']}-frame subset of CamVid day val (one frame in "
        f"{result['val_every']}) to see what adaptation costs at home. Batch 1, the same "
        "images and steps for every adaptation; hyperparameters: `AdaptSettings` defaults, fixed "
        'on source-side reasoning before any target number was seen (docs/methods.md, "SPL '
        'mode"); none was tuned on these labels. A small-budget check that adaptation does not '
        "collapse, one seed: not a ranking.\n\n" + table
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", metavar="NAME=RUN")
    parser.add_argument("--target", choices=["idd", "camvid"], default="idd")
    parser.add_argument("--steps", type=int, help="adaptation steps (default: one pass)")
    parser.add_argument("--out", default="runs/bench_adapt", help="adapted runs go here")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=["spl", "selftrain", "tent"],
        help="only these adaptations (default: every one a run allows)",
    )
    parser.add_argument(
        "--val-every", type=int, default=3, help="score every Nth source val frame (default 3)"
    )
    parser.add_argument(
        "--doc", action="store_true", help='write the "adapt" section of docs/benchmarks.md'
    )
    parser.add_argument(
        "--from-json", nargs="+", metavar="FILE", help="report --json files; run nothing"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        results = [json.loads(Path(f).read_text()) for f in args.from_json]
    elif args.run:
        results = [run_rows(args)]
    else:
        parser.error("give --run NAME=RUN (or --from-json FILE)")
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(results[0], indent=2))
    body = "\n\n".join(report(r) for r in results)
    print(body)
    if args.doc:
        title = "Test-time adaptation (SPL mode, self-training, TENT)"
        commands = "`; `".join(r["command"] for r in results)
        write_section("adapt", title, commands, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
