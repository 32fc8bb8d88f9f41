"""``pivotseg train CONFIG [key=value ...] [--resume RUN_DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  pivotseg train configs/cpu_rein_tinyvit_camvid.yaml
  pivotseg train configs/rein_dinov2l_gta2cbm_512.yaml train.iterations=20000 run_dir=runs/short
  pivotseg train --resume runs/short                  # continue from runs/short/checkpoints/last
  pivotseg train configs/cpu_rein_tinyvit_camvid.yaml --overwrite   # replace the earlier run there
  pivotseg train configs/cpu_rein_tinyvit_camvid.yaml train.iterations=10 --limit 8   # a quick look
  torchrun --nproc_per_node 4 -m pivotseg train configs/rein_dinov2l_gta2cbm_512.yaml

Overrides are dotted keys with YAML values: train.lr=6e-5, data.crop_size=[512,512],
data.targets.0.split=val. The global batch (train.global_batch_size) is kept on any number of
processes by gradient accumulation. One process at a time trains in a run folder; a new run
refuses a folder that is not empty unless --overwrite (which replaces the earlier run's files and
keeps any others). See docs/training.md.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a segmenter from a YAML config",
        description="Train a segmenter (backbone + tuning method + head) from a YAML config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", nargs="?", help="YAML config (default with --resume: RUN_DIR/config.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run (or a checkpoint folder of one)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run_dir that is not empty (its earlier run's files are replaced, "
        "other files kept)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        metavar="N",
        help="stop with a checkpoint after iteration N (the schedule still runs to the end)",
    )
    parser.add_argument(
        "--limit",
        metavar="N|all",
        help="evaluate on at most N evenly spaced frames per dataset (sets eval.limit)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pivotseg.config import load_config
    from pivotseg.engine import TrainingStopped
    from pivotseg.engine.distributed import rank
    from pivotseg.errors import ConfigError
    from pivotseg.outputs import check_output_dir
    from pivotseg.tasks.dgss import train
    from pivotseg.tasks.dgss.train import run_folder_of

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # "pivotseg train --resume RUN key=value"
        config = None
    if config is None:
        if args.resume is None:
            raise ConfigError("pivotseg train: give a CONFIG file (or --resume RUN_DIR)")
        config = run_folder_of(args.resume)[0] / "config.yaml"
    if args.limit is not None:
        from pivotseg.tasks.dgss.evaluate import check_limit

        limit = check_limit(args.limit)
        overrides.append(f"eval.limit={'null' if limit is None else limit}")
    cfg = load_config(config, overrides)
    check_output_dir(run_folder_of(args.resume)[0] if args.resume else cfg.run_dir, "run_dir")
    try:
        run_dir = train(cfg, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    except TrainingStopped as stop:
        if rank() == 0:  # under torchrun every process stops; one says so
            print(f"pivotseg: {stop}", file=sys.stderr)
        return 130
    if rank() == 0:
        print(f"run folder: {run_dir}")
    return 0
