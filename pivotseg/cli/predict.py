"""``pivotseg predict CHECKPOINT IMAGES... --out DIR --format label|color|overlay``."""

from __future__ import annotations

import argparse

from pivotseg.cli.eval import add_tta_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment image files or folders of images into PNGs",
        description=(
            "Segment image files and every image of the folders given. label: class index as "
            "a grey uint8 PNG (Cityscapes trainIds for a Cityscapes-taxonomy model); color: "
            "class colours; overlay: colours blended on the image, with a legend strip beside "
            "it. Each image gives <stem>.png, or "
            "<file name>.png (a.jpg.png) when two images share a stem. Images are segmented "
            "at the run's evaluation size (data.eval_resize_short) and the labels brought "
            "back to the image's size."
        ),
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="run folder, checkpoint or .onnx export"
    )
    parser.add_argument(
        "images", metavar="IMAGES", nargs="+", help="image files and/or folders of images"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--format", choices=["label", "color", "overlay"], default="label")
    parser.add_argument(
        "--no-legend",
        dest="legend",
        action="store_false",
        help="overlay: no legend strip (PNGs of the image's size)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace PNGs already in --out (else refused)"
    )
    parser.add_argument("--mode", choices=["whole", "slide"], help="inference mode")
    parser.add_argument("--crop", type=int, nargs="+", metavar="PX", help="slide window (h [w])")
    parser.add_argument("--stride", type=int, nargs="+", metavar="PX", help="slide stride (h [w])")
    parser.add_argument(
        "--resize-short",
        type=int,
        metavar="PX",
        help="segment at this short side (default: the run's data.eval_resize_short; 0: as is)",
    )
    parser.add_argument(
        "--max-long",
        type=int,
        metavar="PX",
        help="cap the long side at inference (default: the run's data.max_size when no short "
        "side is set; 0: no cap)",
    )
    add_tta_arguments(parser)
    parser.add_argument(
        "--adapt",
        action="store_true",
        help="adapt while predicting: each image in name order is segmented (whole, no slide), "
        "then the model takes one step on it, unlabelled (docs/methods.md, SPL mode)",
    )
    parser.add_argument(
        "--adapt-method",
        choices=["auto", "spl", "selftrain", "tent"],
        default="auto",
        help="with --adapt (default auto: selftrain for DPFT and Rein, else tent; spl only "
        "when asked)",
    )
    parser.add_argument("--backbone-source", help="where the pretrained backbone is now")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: GPU if present)")
    parser.add_argument(
        "--engine",
        choices=["torch", "onnxruntime"],
        help="onnxruntime: an .onnx export (pivotseg export), or a run exported first "
        "(default: onnxruntime for an .onnx file, else torch; docs/deploy.md)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pivotseg.outputs import check_output_dir
    from pivotseg.tasks.dgss import predict

    check_output_dir(args.out, "--out")
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
        resize_short=args.resize_short,
        max_long=args.max_long,
        overwrite=args.overwrite,
        labeller=_adapting(args),
        legend=args.legend,
        engine=args.engine,
        tta_scales=args.tta_scales,
        tta_flip=args.tta_flip,
    )
    print(f"wrote {len(written)} PNGs to {args.out}")
    return 0


def _adapting(args: argparse.Namespace):
    if not args.adapt:
        return None
    from pivotseg.tasks.adapt import stream_labeller

    return stream_labeller(method=args.adapt_method)
