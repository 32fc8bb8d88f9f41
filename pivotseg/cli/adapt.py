"""``pivotseg adapt RUN --images DIR --out NEW_RUN [--method spl|selftrain|tent|auto]``."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  pivotseg adapt runs/dpft --images /data/target_frames --out runs/dpft_adapted
  pivotseg adapt runs/rein --images /data/target_frames --out runs/rein_tent --method tent
  pivotseg eval runs/dpft_adapted --data tgt=/data/target:cityscapes:val   # as any run
No target label is read (with --source-replay, spl/selftrain also train on the run's own
labelled source data); the source run is only read; NEW_RUN appears only when adaptation finished.
"""


# pivotseg.tasks.adapt.settings.ADAPT_METHODS (not imported: `pivotseg --help` stays fast)
ADAPT_METHODS = ("auto", "spl", "selftrain", "tent")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="adapt a trained run to unlabelled target images (SPL mode, TENT)",
        description=(
            "Adapt a run to a folder of unlabelled target images and save the result as a new "
            "run. spl: DPFT's dynamic parts and the normalisation layers by mean-teacher "
            "self-training against a multi-scale teacher (with --source-replay: also the head, "
            "on labelled source crops and ClassMix), and set pivots moved toward the target (a "
            "DPFT run trained with pivot_loss or presence_gating on: DPFT's default has no pivots); "
            "selftrain: the same without pivots (e.g. Rein, default DPFT); tent: entropy "
            "minimisation of the normalisation layers; auto: selftrain when the run's method "
            "declares adaptable parameters, else tent (spl only when asked: its pivot parts "
            "measured no effect, docs/methods.md)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="run folder or checkpoint folder")
    parser.add_argument("--images", required=True, metavar="DIR", help="target images (a folder)")
    parser.add_argument("--out", required=True, metavar="NEW_RUN", help="new run folder")
    parser.add_argument("--method", choices=ADAPT_METHODS, default="auto")
    add_setting_flags(parser)
    parser.add_argument("--backbone-source", help="where the pretrained backbone is now")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: GPU if present)")
    parser.set_defaults(func=run)


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """The hyperparameter flags (defaults and reasons: docs/methods.md, "SPL mode")."""
    group = parser.add_argument_group("adaptation settings (default: docs/methods.md)")
    group.add_argument("--steps", type=int, help="optimiser steps (default: one pass)")
    group.add_argument("--batch-size", type=int, help="images per step (default 1)")
    group.add_argument(
        "--source-replay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="spl/selftrain: also train on the run's labelled source data (data.source of its "
        "config.yaml) with ClassMix, DAFormer-style (default: off, source-free; the proxy "
        "chose it, docs/methods.md)",
    )
    group.add_argument("--lr", type=float, help="Adam learning rate (default: docs/methods.md)")
    group.add_argument(
        "--pseudo-threshold", type=float, help="source replay: DAFormer's tau (default 0.968)"
    )
    group.add_argument(
        "--target-selection",
        choices=("quality", "class_balanced"),
        help="source replay: DAFormer's quality weight or CBST's per-class selection",
    )
    group.add_argument(
        "--entropy-weight",
        type=float,
        help="entropy term on the target pixels (default 1; 0: off)",
    )
    group.add_argument(
        "--target-weight",
        type=float,
        help="source replay: weight of the target terms (default 1); 0 with --no-class-mix is "
        "the replay-only control (continued source training, no target signal)",
    )
    group.add_argument(
        "--class-mix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="source replay: ClassMix source classes onto the target crop (default on)",
    )
    group.add_argument(
        "--adapt-norms",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the normalisation layers' affine parameters join the student, TENT's set "
        "(default: on)",
    )
    group.add_argument("--teacher-momentum", type=float, help="teacher EMA (default 0.9)")
    group.add_argument(
        "--teacher-scales",
        type=float,
        nargs="+",
        metavar="S",
        help="scales the teacher's pseudo-labels average, each with its flip; 1 among them "
        "(default: 1 only)",
    )
    group.add_argument(
        "--restore-prob", type=float, help="stochastic restore (default 0.01, 0 with replay)"
    )
    group.add_argument(
        "--class-fraction", type=float, help="pseudo-labelled share per class (default 0.5)"
    )
    group.add_argument("--confidence-floor", type=float, help="least confidence (default 0.5)")
    group.add_argument("--pivot-momentum", type=float, help="pivot EMA (default 0.99)")
    group.add_argument("--resize-short", type=int, metavar="PX", help="resize short side first")
    group.add_argument("--seed", type=int, help="image order and restore masks (default 0)")


SETTING_FLAGS = (
    "steps",
    "batch_size",
    "source_replay",
    "lr",
    "pseudo_threshold",
    "target_selection",
    "entropy_weight",
    "target_weight",
    "class_mix",
    "adapt_norms",
    "teacher_momentum",
    "teacher_scales",
    "restore_prob",
    "class_fraction",
    "confidence_floor",
    "pivot_momentum",
    "resize_short",
    "seed",
)


def settings_from(args: argparse.Namespace, method: str):
    from pivotseg.tasks.adapt import AdaptSettings

    given = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k, None) is not None}
    return AdaptSettings.with_overrides(None, method=method, **given)


def run(args: argparse.Namespace) -> int:
    import json

    from pivotseg.tasks.adapt import adapt_run
    from pivotseg.tasks.adapt.offline import ADAPT_FILE

    out = adapt_run(
        args.run,
        args.images,
        args.out,
        settings_from(args, args.method),
        backbone_source=args.backbone_source,
        device=args.device,
    )
    summary = json.loads((out / ADAPT_FILE).read_text())
    print(
        f"adapted {args.run} with {summary['method']} on {len(summary['image_files'])} images "
        f"({summary['settings']['steps']} steps, {summary['resets']} resets) -> {out}"
    )
    return 0
