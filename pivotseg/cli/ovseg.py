"""``pivotseg ovseg``: training-free open-vocabulary segmentation with CLIP.

pivotseg ovseg IMAGES... --classes "road,car,sky" --out DIR [--variant naclip]
pivotseg ovseg --eval-data /data/camvid_day --eval-format camvid --eval-split test
"""

from __future__ import annotations

import argparse

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
# pivotseg.tasks.openvocab.dense.VARIANTS (not imported: it pulls torch into `pivotseg --help`;
# tests/test_cli_startup.py keeps the two equal)
VARIANTS = ("clip", "maskclip", "sclip", "clearclip", "naclip", "proxyclip")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ovseg",
        help="open-vocabulary segmentation with CLIP (no training)",
        description=(
            "Segment images into classes named in words with a frozen CLIP ViT whose last block "
            "follows MaskCLIP, SCLIP, ClearCLIP, NACLIP or ProxyCLIP; optionally score it on a "
            "dataset (its class names are used when --classes is not given)."
        ),
    )
    p.add_argument("images", nargs="*", help="image files or folders of images")
    names = p.add_mutually_exclusive_group()
    names.add_argument(
        "--classes", help='comma-separated class names, ";" between synonyms: "road,car,sky"'
    )
    names.add_argument("--classes-file", help="text file, one class per line")
    p.add_argument("--out", help="folder for <stem>.png labels and <stem>_color.png")
    p.add_argument(
        "--overlay",
        action="store_true",
        help="also write <stem>_overlay.png: class colours blended on the image, with a legend",
    )
    p.add_argument(
        "--no-legend",
        dest="legend",
        action="store_false",
        help="--overlay: no legend strip (PNGs of the image's size)",
    )
    p.add_argument("--variant", default="naclip", choices=list(VARIANTS))
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP source (default {DEFAULT_CLIP})")
    p.add_argument("--background", default="", help="comma-separated background prompts")
    p.add_argument(
        "--threshold", type=float, default=0.0, help="probability below which pixels are background"
    )
    p.add_argument(
        "--templates", default="imagenet", help="imagenet (OpenAI's 80 templates) or single"
    )
    p.add_argument("--mode", choices=["slide", "whole"], default="slide")
    p.add_argument("--crop", type=int, help="window size (default: the variant's)")
    p.add_argument("--stride", type=int, help="window step (default: the variant's)")
    p.add_argument("--resize-short", type=int, help="resize the short image side first")
    pamr = p.add_mutually_exclusive_group()
    pamr.add_argument("--pamr", dest="pamr", action="store_true", default=None)
    pamr.add_argument("--no-pamr", dest="pamr", action="store_false")
    p.add_argument("--vfm", default="dinov2", help="proxyclip: backbone name of the VFM")
    p.add_argument("--vfm-source", help="proxyclip: where the VFM weights are")
    p.add_argument("--eval-data", help="dataset folder to compute mIoU on")
    p.add_argument(
        "--eval-format", default="folder", help="dataset format (camvid, cityscapes, ...)"
    )
    p.add_argument("--eval-split", help="dataset split (e.g. val, test)")
    p.add_argument("--limit", type=int, help="evaluate on the first N images only")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    p.set_defaults(func=run)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")] if text else []


def run(args: argparse.Namespace) -> int:
    from pivotseg.errors import ConfigError
    from pivotseg.tasks.openvocab.ovseg import run_ovseg
    from pivotseg.tasks.openvocab.run import format_result

    if not args.images and not args.eval_data:
        raise ConfigError("ovseg: give IMAGES to segment and/or --eval-data to score")
    if args.images and not args.out:
        raise ConfigError("ovseg: --out DIR is required to write predictions")
    if args.out:
        from pivotseg.outputs import check_output_dir

        check_output_dir(args.out, "--out")

    def on_written(written):
        extra = "_color.png, _overlay.png" if args.overlay else "_color.png"
        print(f"wrote {len(written)} label maps (+ {extra}) to {args.out}")

    result = run_ovseg(
        args.images,
        args.out,
        clip=args.clip,
        variant=args.variant,
        classes=_split(args.classes) if args.classes is not None else None,
        classes_file=args.classes_file,
        eval_data=args.eval_data,
        eval_format=args.eval_format,
        eval_split=args.eval_split,
        limit=args.limit,
        device=args.device,
        overlay=args.overlay,
        legend=args.legend,
        vfm=args.vfm,
        on_written=on_written,
        background=_split(args.background),
        threshold=args.threshold,
        templates=args.templates,
        mode=args.mode,
        crop=args.crop,
        stride=args.stride,
        resize_short=args.resize_short,
        pamr=args.pamr,
        vfm_source=args.vfm_source,
    )
    if result is not None:
        print(format_result(result))
    return 0
