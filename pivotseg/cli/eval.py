"""``pivotseg eval RUN_OR_CHECKPOINT --data NAME=PATH[:FORMAT[:SPLIT]] ...``."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  pivotseg eval runs/rein --data cityscapes=/data/cityscapes:cityscapes:val \\
      --data bdd=/data/bdd100k:bdd100k:val --mode slide --crop 512 --stride 341
  pivotseg eval runs/rein                    # the targets of the run's config
  pivotseg eval runs/rein --limit 20 --json eval.json   # 20 frames per dataset, per-class JSON
  torchrun --nproc_per_node 4 -m pivotseg eval runs/rein   # each process scores a shard
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="mIoU of a trained segmenter on several datasets",
        description="Score a run or checkpoint on target datasets: mIoU per target and mean.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint or .onnx export"
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH[:FORMAT[:SPLIT]]",
        help="a target dataset (repeat for several; default: the run's data.targets)",
    )
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode")
    parser.add_argument("--crop", type=int, nargs="+", metavar="PX", help="slide window (h [w])")
    parser.add_argument("--stride", type=int, nargs="+", metavar="PX", help="slide stride (h [w])")
    parser.add_argument("--batch-size", type=int, help="crops per forward pass (slide mode)")
    add_tta_arguments(parser)
    parser.add_argument("--resize-short", type=int, metavar="PX", help="resize short side first")
    parser.add_argument("--backbone-source", help="where the pretrained backbone is now")
    parser.add_argument(
        "--engine",
        choices=["torch", "onnxruntime"],
        help="onnxruntime: an .onnx export (pivotseg export), or a run exported first "
        "(default: onnxruntime for an .onnx file, else torch; docs/deploy.md)",
    )
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], help="autocast")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes")
    parser.add_argument(
        "--limit",
        metavar="N|all",
        help="score at most N evenly spaced frames per dataset (default: the run's eval.limit, "
        "else all)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write the results as JSON (docs/evaluation.md)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pivotseg.tasks.dgss import evaluate

    evaluate(
        args.checkpoint,
        targets=args.data,
        mode=args.mode,
        crop=args.crop,
        stride=args.stride,
        batch_size=args.batch_size,
        resize_short=args.resize_short,
        backbone_source=args.backbone_source,
        mixed_precision=args.precision,
        num_workers=args.workers,
        output=args.json,
        limit=args.limit,
        engine=args.engine,
        tta_scales=args.tta_scales,
        tta_flip=args.tta_flip,
    )
    return 0


def add_tta_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tta-scales`` / ``--tta-flip``: test-time augmentation (eval and predict)."""
    parser.add_argument(
        "--tta-scales",
        type=float,
        nargs="+",
        metavar="S",
        help="test-time augmentation: segment at each scale and average the softmax, e.g. "
        "0.75 1 1.25 (default: the run's eval.tta_scales, else 1)",
    )
    parser.add_argument(
        "--tta-flip",
        action=argparse.BooleanOptionalAction,
        help="with each scale also its horizontal flip (default: the run's eval.tta_flip)",
    )
