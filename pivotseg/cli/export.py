"""``pivotseg export RUN --format onnx [--size HxW | --dynamic] [--output logits|argmax] --out FILE``."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  pivotseg export runs/dpft --format onnx --dynamic --out dpft.onnx      # any image size
  pivotseg export runs/dpft --format onnx --size 512x1024 --out dpft.onnx
  pivotseg predict dpft.onnx images/ --out preds --engine onnxruntime
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained segmenter to ONNX (+ a JSON sidecar)",
        description=(
            "Export the whole segmenter (backbone, tuning method with LoRA merged, head) of a "
            "run or checkpoint to ONNX, with FILE.json beside it: classes, palette, "
            "normalisation, input size policy and the run's evaluation resize. The graph takes "
            "float32 RGB (B, 3, H, W) on the 0-255 scale and normalises inside. Every export is "
            "checked against the eager model on ONNX Runtime (max logit difference 1e-3) "
            "before anything is written (docs/deploy.md)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="(only onnx)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--size",
        metavar="HxW",
        help="fixed input size (default: --dynamic); predict then slides windows of this size",
    )
    size.add_argument(
        "--dynamic",
        action="store_true",
        help="any input size that is a multiple of the backbone's size divisor (the default)",
    )
    parser.add_argument(
        "--output",
        choices=["logits", "argmax"],
        default="logits",
        help="logits (B, K, H, W), or class indices (B, H, W) for other runtimes",
    )
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE.onnx/.json")
    parser.add_argument("--backbone-source", help="where the pretrained backbone is now")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pivotseg.deploy.export import export_run, parse_size

    size = parse_size(args.size) if args.size else None
    out = export_run(
        args.checkpoint,
        args.out,
        size=size,
        output=args.output,
        backbone_source=args.backbone_source,
        overwrite=args.overwrite,
    )
    from pivotseg.deploy.sidecar import read_sidecar, sidecar_path

    check = read_sidecar(out)["export"]["check"]
    worst = next(v for k, v in check.items() if k.startswith(("max_", "share_")))
    print(f"wrote {out} and {sidecar_path(out)} (ONNX Runtime vs eager: {worst:.1e})")
    return 0
