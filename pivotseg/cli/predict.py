"""``pivotseg predict CHECKPOINT IMAGES_DIR --out DIR --format label|color|overlay``."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a folder of images into PNGs",
        description=(
            "Segment every image of a folder. label: class index as a grey uint8 PNG "
            "(Cityscapes trainIds for a Cityscapes-taxonomy model); color: class colours; "
            "overlay: colours blended on the image."
        ),
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder or checkpoint")
    parser.add_argument("images", metavar="IMAGES_DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--format", choices=["label", "color", "overlay"], default="label")
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode")
    parser.add_argument("--crop", type=int, nargs="+", metavar="PX", help="slide window (h [w])")
    parser.add_argument("--stride", type=int, nargs="+", metavar="PX", help="slide stride (h [w])")
    parser.add_argument("--backbone-source", help="where the pretrained backbone is now")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: GPU if present)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pivotseg.tasks.dgss import predict

    written = predict(
        args.checkpoint,
        args.images,
        args.out,
        format=args.format,
        mode=args.mode,
        crop=args.crop,
        stride=args.stride,
        backbone_source=args.backbone_source,
        device=args.device,
    )
    print(f"wrote {len(written)} PNGs to {args.out}")
    return 0
