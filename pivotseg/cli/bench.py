"""``pivotseg bench dg``: compare tuning methods under one budget over seeds and targets."""

from __future__ import annotations

import argparse
from pathlib import Path

from pivotseg.paths import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"

EPILOG = """\
examples:
  pivotseg bench dg                                   # the CamVid-day protocol, 5 methods x 3 seeds
  pivotseg bench dg --methods rein dpft --seeds 0 1 2 --target night=/data/camvid_dusk:camvid:test
  pivotseg bench dg --config my_base.yaml train.iterations=1000
  pivotseg bench dg --methods frozen --row "famix=runs/famix_inputs/row_model.yaml"
  pivotseg bench dg --quick                           # smoke run of the pipeline, a few minutes
  pivotseg bench dg --limit 20                        # score 20 frames per dataset (a short look)

Targets are NAME=PATH[:FORMAT[:SPLIT[:DOMAIN]]]; classes are mapped to the source taxonomy where
a mapping exists (CamVid <-> Cityscapes, see docs/datasets.md). Runs found in --out are reused
(finished) or resumed (interrupted) when their settings and pivotseg version match; runs made with
other settings stop the benchmark before it trains, unless --rerun moves them aside to
<run>.old-<k>. Nothing in --out is deleted.
A --row file holds a model: section (backbone, method, head) that replaces the base config's
model for that row; data, budget, seeds and targets stay the base's, and model.* overrides
apply to the base rows only. --methods with no names runs the --row rows alone.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (bench dg: tuning methods compared)")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    dg = sub.add_parser(
        "dg",
        help="train every tuning method with one budget; mIoU per target over seeds",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dg.add_argument("overrides", nargs="*", metavar="key=value", help="base config overrides")
    dg.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base run config (YAML)")
    dg.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="tuning methods (default: frozen full lora rein dpft)",
    )
    dg.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="LABEL=MODEL_YAML",
        help="an extra row with its own model: section (repeatable), after the methods",
    )
    dg.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (--quick: 0)")
    dg.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=PATH[:FORMAT[:SPLIT]]",
        help="an unseen target dataset (repeatable; default: the config's targets)",
    )
    dg.add_argument(
        "--out",
        type=Path,
        help="results folder (default: runs/bench_dg; --quick: runs/bench_dg_quick)",
    )
    dg.add_argument(
        "--rerun",
        action="store_true",
        help="train again the runs in --out made with other settings or another pivotseg "
        "version, moving each aside to <run>.old-<k> first (default: refuse)",
    )
    dg.add_argument(
        "--quick",
        action="store_true",
        help="smoke run of the pipeline: seed 0, 10 iterations, 4 evaluation frames per dataset; "
        "numbers are not results",
    )
    dg.add_argument(
        "--limit",
        metavar="N|all",
        help="score at most N evenly spaced frames per evaluated dataset (eval.limit of every "
        "run; default: the config's, --quick: 4); the tables say so",
    )
    dg.set_defaults(func=run_dg)


def run_dg(args: argparse.Namespace) -> int:
    from pivotseg.benchmarking import bench_runs
    from pivotseg.benchmarking.benchmark import (
        DEFAULT_METHODS,
        BenchPlan,
        load_row_model,
        run_benchmark,
    )
    from pivotseg.config import DatasetSpec
    from pivotseg.errors import ConfigError
    from pivotseg.outputs import check_output_dir

    if not args.config.is_file():
        raise ConfigError(f"{args.config}: no such config; pass --config BASE.yaml")
    from pivotseg.tasks.dgss.evaluate import check_limit

    quick = args.quick
    eval_frames = bench_runs.QUICK_EVAL_FRAMES if quick else None
    if args.limit is not None:
        eval_frames = check_limit(args.limit)
    out = args.out or (bench_runs.QUICK_OUT if quick else Path("runs/bench_dg"))
    check_output_dir(out, "--out")
    targets = [DatasetSpec.from_string(t) for t in args.target]
    for spec in targets:
        if not Path(spec.path).exists():
            raise ConfigError(
                f"--target {spec.label}: {spec.path} does not exist; give "
                "NAME=PATH[:FORMAT[:SPLIT]] with the dataset's root folder (see docs/datasets.md)"
            )
    methods = list(DEFAULT_METHODS if args.methods is None else args.methods)
    models = {}
    for item in args.row:
        label, sep, path = item.partition("=")
        label = label.strip()
        if not sep or not label or not path:
            raise ConfigError(f"--row {item!r}: write LABEL=MODEL_YAML, e.g. famix=famix_row.yaml")
        if label in methods or label in models:
            raise ConfigError(f"--row {label}: that label is already a row; choose another")
        models[label] = load_row_model(path, label)
    if not methods and not models:
        raise ConfigError("bench dg: no rows; name --methods or give --row LABEL=MODEL_YAML")
    plan = BenchPlan(
        config=args.config,
        methods=methods + list(models),
        models=models,
        seeds=list(args.seeds or (bench_runs.QUICK_SEEDS if quick else [0, 1, 2])),
        targets=targets,
        out_dir=out,
        overrides=(bench_runs.QUICK_OVERRIDES if quick else []) + list(args.overrides),
        eval_frames=eval_frames,
        rerun=args.rerun,
    )
    result = run_benchmark(plan)
    if quick:
        print("bench dg --quick: a smoke run of the pipeline; these numbers are not results")
    print(result["table"])
    print(f"results: {out / 'results.json'}, table: {out / 'table.md'}", end="")
    print(
        f", chart: {result['chart']}" if result["chart"] else " (no chart: pip install matplotlib)"
    )
    return 0
