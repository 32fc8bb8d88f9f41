"""Test-time adaptation benchmark: source-only against adapted, paired by seed, on held-out
frames of shifted targets.

    python bench/adapt.py --run dpft=RUNS/dpft/seed{seed} --run rein=RUNS/rein/seed{seed} \
        --seeds 0 1 2 --methods dpft=selftrain --methods rein=selftrain,tent \
        --targets idd adverse [--steps 100] [--out runs/bench_adapt] --json FILE [--doc] \
        [--proxy-json FILE ...]
    python bench/adapt.py --from-json FILE [--proxy-json FILE] --doc   # re-render only
    python bench/adapt.py --from-json bench/results/adapt_tent_baselines.json --doc \
        --section adapt_tent_baselines \
        --title "Test-time adaptation: TENT on frozen and full fine-tuning beside DPFT (CPU)"

Each run (one per seed: ``{seed}`` in its path) is adapted with the given adaptations on the same
images and budget, and scored with its source-only model beside it on:

* the held-out part of each target, split so that no scored frame is adapted on:
  ``idd``: IDD Lite val split by sequence (sorted sequence ids, every other sequence adapts, the
  rest is scored; frames at the source's 360-pixel short side, as bench dg scores them);
  ``adverse``: the adverse-condition Seq05VD of bench dg (each frame under one of fog, night,
  rain, snow, motion blur, glare; the copy the run's config.yaml names), split in time (first
  half adapts, second half is scored); ``camvid``: clean Seq05VD, split the same way;
* the source validation split (CamVid day val, one frame in ``--val-every``), to see what
  adaptation costs at home (the bar: within 2 mIoU of before).

Adaptation reads only the images of its half (no label); labels are read only for scoring. The
hyperparameters are :class:`~pivotseg.tasks.adapt.AdaptSettings`' defaults, chosen on the
source-side proxy (bench/adapt_proxy.py) before any target number was seen; do not pick settings
on this script's numbers. Rows are appended to ``--json`` as they finish and a rerun skips the
rows already there, so an interrupted benchmark resumes.

``spl``, ``selftrain`` and ``tent`` adapt with the defaults (source-free; the self-training
with its multi-scale teacher); ``spl-replay`` and ``selftrain-replay`` also train on the run's
labelled source data (DAFormer-style replay, the offline default before session 8).
``spl-stream``, ``selftrain-stream``, ``tent-stream`` are online rows: the held-out frames in
order are the stream, each predicted before the model takes its (source-free) step on it, and
those predictions are scored (CoTTA's protocol); then the final model is scored on source val.
``selftrain-flip-stream`` is the stream with the teacher of the image and its flip only.

``replay-only`` is the control of the replay adaptations: the same steps on the run's labelled
source crops with no target term (``target_weight=0``, no ClassMix), i.e. continued source
training; what an adaptation gains beyond it is what the target images gave.

The report pairs by seed (:func:`pivotseg.evaluation.paired.paired_difference`): each adaptation
minus its own run's source-only row and minus its run's replay-only control, ``spl`` minus
``selftrain`` on the same run and mode (what the pivot parts add), and each DPFT adaptation
minus the other runs' adaptations of its kind (offline or stream), with the mean and the 95 %
Student-t interval; the issue's bar is checked on every DPFT adaptation against source only.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import machine, markdown_table, write_section
from pivotseg.config import EvalConfig
from pivotseg.data import build_dataset
from pivotseg.data.transforms import eval_transforms
from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
from pivotseg.evaluation.paired import paired_difference
from pivotseg.paths import shared_path
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.adapt import AdaptSettings, adapt_run, evaluate_stream
from pivotseg.tasks.adapt.selftrain import augmented_probs
from pivotseg.tasks.dgss.evaluate import TaxonomyBridge, as_percent, evaluate_datasets, score_into

ROOT = check_checkout(__file__)

SOURCE_SHORT = 360  # CamVid day frames are 480x360
TARGETS = {
    "idd": "IDD Lite val split by sequence (every other sequence adapts, the rest is scored; "
    "360-pixel short side; IDD's 7 level-1 classes through the CamVid -> IDD class map)",
    "adverse": "adverse-condition Seq05VD (bench dg's copy: each frame under one of fog, night, "
    "rain, snow, motion blur, glare at severity 3) split in time (first half adapts, second "
    "half is scored)",
    "camvid": "clean CamVid Seq05VD split in time (first half adapts, second half is scored)",
}


def split_target(target: str, run_cfg=None):
    """``(the adapted half, the scored half, resize_short)``: two labelled datasets with
    evaluation transforms (adaptation reads only the first's image files; bench/adapt_oracle.py
    its labels too)."""
    if target == "idd":
        root = shared_path("data", "idd_lite")
        short = SOURCE_SHORT
        full = build_dataset(root, "idd_lite", "val", transform=eval_transforms(short))
        sequences = sorted({s.domain for s in full.samples}, key=lambda d: (len(d), d))
        adapt_seqs = set(sequences[0::2])
        adapt = [s for s in full.samples if s.domain in adapt_seqs]
        score = [s for s in full.samples if s.domain not in adapt_seqs]
    else:
        if target == "adverse":
            from pivotseg.data.from_spec import dataset_from_spec

            spec = _adverse_spec(run_cfg)
            full = dataset_from_spec(spec, transform=eval_transforms(spec.resize_short))
        else:
            full = build_dataset(
                shared_path("data", "camvid_day"), "camvid", "test", transform=eval_transforms()
            )
        short = None
        ordered = sorted(full.samples, key=lambda s: s.image.name)
        adapt, score = ordered[: len(ordered) // 2], ordered[len(ordered) // 2 :]
    adapt_set = copy.copy(full)
    adapt_set.samples, full.samples = adapt, score
    return adapt_set, full, short


def target_sets(args, target: str, val) -> tuple:
    """``(the adapted half, {"target": the scored half, "source_val": val}, resize_short)`` of
    ``target``, split as the config of the first ``--run`` (at the first seed) names it."""
    first = args.run[0].split("=", 1)[1].format(seed=args.seeds[0])
    adapt, held_out, short = split_target(target, find_run_config(resolve_model_folder(first)))
    return adapt, {"target": held_out, "source_val": val}, short


def source_val(val_every: int):
    """CamVid day val, one frame in ``val_every``: a check that home is kept, not a headline."""
    val = build_dataset(
        shared_path("data", "camvid_day"), "camvid", "val", transform=eval_transforms()
    )
    val.samples = val.samples[::val_every]
    return val


def _adverse_spec(run_cfg):
    """The ``seq05vd_adverse`` target of the run's config (bench dg's), else the same spec."""
    from pivotseg.config import DatasetSpec

    for spec in getattr(getattr(run_cfg, "data", None), "targets", None) or []:
        if spec.corruptions and spec.format == "camvid":
            return spec
    return DatasetSpec(
        path=str(shared_path("data", "camvid_day")),
        format="camvid",
        split="test",
        name="seq05vd_adverse",
        corruptions=["fog:3", "night:3", "rain:3", "snow:3", "motion_blur:3", "glare:3"],
        corruption_seed=0,
    )


# Adaptation names of --methods and their adapt_run settings: the defaults (source-free, the
# multi-scale teacher), the same with source replay (DAFormer-style, the default before session
# 8), and the replay control ``replay-only``: the same steps of source replay with no target term,
# i.e. continued source training (the 300-iteration source runs are not converged, so extra
# source steps alone can move a target).
ADAPTATIONS = {
    "spl": {"method": "spl"},
    "selftrain": {"method": "selftrain"},
    "tent": {"method": "tent"},
    "spl-replay": {"method": "spl", "source_replay": True},
    "selftrain-replay": {"method": "selftrain", "source_replay": True},
    "replay-only": {
        "method": "selftrain",
        "source_replay": True,
        "target_weight": 0.0,
        "class_mix": False,
    },
}
CONTROL = "replay-only"
HEADLINE = "dpft"  # the run whose adaptations the bar is about
# Online rows: the scored half itself is the stream, each frame predicted before the step on it
# (pivotseg.tasks.adapt.evaluate_stream), source-free, one step per frame. ``selftrain-flip``:
# the stream recipe before the multi-scale teacher (the image and its flip only).
STREAM = "-stream"
ADAPTATIONS.update({f"{m}{STREAM}": {"method": m} for m in ("spl", "selftrain", "tent")})
ADAPTATIONS[f"selftrain-flip{STREAM}"] = {"method": "selftrain", "teacher_scales": [1.0]}
# The source model predicting as the stream's teacher does (flips at the default source-free
# teacher_scales), never adapted: a self-training stream's prediction is that average, so this
# row, not plain source only, separates its adaptation from its test-time augmentation.
TTA = "source TTA"


def score(model, datasets) -> dict:
    record = evaluate_datasets(model, datasets, EvalConfig(mode="whole"), val_name="source_val")
    return {"miou": record["targets"]["target"]["miou"], "source_val": record["val"]["miou"]}


def _key(row: dict) -> tuple:
    return row["target"], row["run"], row["seed"], row["adaptation"]


def run_rows(args, result: dict) -> dict:
    """Adapt and score every (target, run, seed, adaptation) not yet in ``result``."""
    val = source_val(args.val_every)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in result["rows"]}
    methods = dict(m.split("=", 1) for m in args.methods or [])
    runs = [spec.split("=", 1) for spec in args.run]
    for target in args.targets:
        adapt_set, datasets, short = target_sets(args, target, val)
        images = [s.image for s in adapt_set.samples]  # their labels are never read here
        scored = len(datasets["target"])
        result["frames"][target] = {"adapt": len(images), "score": scored}
        print(f"{target}: adapt on {len(images)} frames, score {scored}", flush=True)
        for seed in args.seeds:
            for name, pattern in runs:
                run = pattern.format(seed=seed)
                wanted = [] if args.no_source_only else ["source only"]
                wanted += [m for m in methods.get(name, "spl").split(",") if m]
                unknown = [m for m in wanted[1:] if m not in ADAPTATIONS and m != TTA]
                if unknown:
                    sys.exit(f"--methods {name}={','.join(unknown)}: use {', '.join(ADAPTATIONS)}")
                todo = [m for m in wanted if (target, name, seed, m) not in done]
                if not todo:
                    continue
                model = load_segmenter(resolve_model_folder(run))
                for method in todo:
                    row = {"target": target, "run": name, "seed": seed, "adaptation": method}
                    if method == "source only":
                        row.update(score(model, datasets))
                    elif method == TTA:  # the unadapted model: source val is source only's
                        base = (target, name, seed, "source only")
                        known = [r["source_val"] for r in result["rows"] if _key(r) == base]
                        row.update(_tta_score(model, datasets, known[0] if known else None))
                    elif method.endswith(STREAM):
                        row.update(_stream_and_score(run, row, datasets))
                    else:
                        row.update(_adapt_and_score(run, images, out, row, short, args, datasets))
                    result["rows"].append(row)
                    done.add(_key(row))
                    print(row, flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _adapt_and_score(run, images, out, row, short, args, datasets) -> dict:
    folder = out / f"{row['target']}_{row['run']}_seed{row['seed']}_{row['adaptation']}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    adapt_run(
        run, images, folder, steps=args.steps, resize_short=short, seed=row["seed"],
        progress=False, **ADAPTATIONS[row["adaptation"]],
    )  # fmt: skip
    seconds = time.time() - start
    summary = json.loads((folder / "adapt.json").read_text())
    adapted = load_segmenter(resolve_model_folder(folder))
    steps = summary["settings"]["steps"]
    return {
        **score(adapted, datasets),
        "steps": steps,
        "replay": summary.get("source_replay") is not None,
        "resets": summary["resets"],
        "adapted_params": summary["adapted_parameter_count"],
        "sec_per_frame": round(seconds / (steps * summary["settings"]["batch_size"]), 2),
    }


def _tta_score(model, datasets, source_val: float | None = None) -> dict:
    """The target scored with the stream teacher's augmentation of the source model (no step),
    and source val as source only scores it (``source_val``: that row's, when already scored)."""
    from pivotseg.evaluation import ConfusionMatrix

    scales = AdaptSettings().resolved(replay=False).teacher_scales
    target = datasets["target"]
    classes = getattr(model.config, "class_names", None)
    bridge = TaxonomyBridge(classes, model.config.num_classes, target.classes, "target")
    matrix = ConfusionMatrix(len(target.classes))
    model.eval()
    for index in range(len(target)):
        item = target[index]
        probs = augmented_probs(model, item["image"][None].float(), scales)
        score_into(matrix, bridge, probs.clamp_min(1e-12).log(), item["label"][None])
    if source_val is None:
        val = {"source_val": datasets["source_val"]}
        record = evaluate_datasets(model, val, EvalConfig(mode="whole"), val_name="source_val")
        source_val = record["val"]["miou"]
    return {
        "miou": as_percent(matrix.compute())["miou"],
        "source_val": source_val,
        "teacher_scales": list(scales),
    }


def _stream_and_score(run, row, datasets) -> dict:
    """Online: the held-out frames in order are the stream; scored as predicted, then the
    final model on source val."""
    model = load_segmenter(resolve_model_folder(run))
    start = time.time()
    stream = evaluate_stream(
        model, datasets["target"], label=row["target"], seed=row["seed"],
        **ADAPTATIONS[row["adaptation"]],
    )  # fmt: skip
    seconds = time.time() - start
    val = {"source_val": datasets["source_val"]}
    record = evaluate_datasets(model, val, EvalConfig(mode="whole"), val_name="source_val")
    return {
        "miou": stream["miou"],
        "source_val": record["val"]["miou"],
        "online": True,
        "sec_per_frame": round(seconds / stream["frames"], 2),
    }


def values_by_seed(rows, target, run, adaptation, field) -> dict[int, float]:
    """``{seed: row[field]}`` of the rows of (target, run, adaptation)."""
    return {
        r["seed"]: r[field]
        for r in rows
        if r["target"] == target and r["run"] == run and r["adaptation"] == adaptation
    }


def _kind(adaptation: str) -> str:
    return "stream" if adaptation.endswith(STREAM) else "offline"


def paired_rows(result: dict, target: str) -> list[tuple[str, object, object]]:
    """``(comparison, target difference, source-val difference)`` for the report: every
    adaptation against its run's source only and against its run's replay-only control (the
    gain beyond continued source training), a source-free adaptation against the same with
    source replay (``X`` against ``X-replay``), spl against selftrain on the same run and mode
    (the pivots' share), and DPFT's adaptations against the other runs' of the same kind."""
    rows = result["rows"]
    present = sorted({(r["run"], r["adaptation"]) for r in rows if r["target"] == target})
    adapted = [(run, a) for run, a in present if a not in ("source only", TTA)]
    comparisons = [((run, a), (run, "source only")) for run, a in adapted]
    comparisons += [  # a self-training stream against the source with its teacher's TTA
        ((run, a), (run, TTA))
        for run, a in adapted
        if a.endswith(STREAM) and not a.startswith("tent") and (run, TTA) in present
    ]
    comparisons += [((run, TTA), (run, "source only")) for run, a in present if a == TTA]
    comparisons += [
        ((run, a), (run, CONTROL))
        for run, a in adapted
        if a != CONTROL and (run, CONTROL) in present
    ]
    comparisons += [  # the default (source-free) against the same with source replay
        ((run, a), (run, f"{a}-replay")) for run, a in adapted if (run, f"{a}-replay") in present
    ]
    comparisons += [
        ((run, a), (run, a.replace("spl", "selftrain")))
        for run, a in adapted
        if a.startswith("spl") and (run, a.replace("spl", "selftrain")) in present
    ]
    comparisons += [
        ((run, a), other)
        for run, a in adapted
        if run == HEADLINE and a != CONTROL
        for other in adapted
        if other[0] != run and other[1] != CONTROL and _kind(other[1]) == _kind(a)
    ]
    pairs = []
    for (run, a), (other, b) in comparisons:
        diffs = [
            paired_difference(
                values_by_seed(rows, target, run, a, f),
                values_by_seed(rows, target, other, b, f),
            )
            for f in ("miou", "source_val")
        ]
        first = f"{run} {a}" if a == TTA else f"{run} + {a}"
        second = f"{other} {b}" if b in ("source only", TTA) else f"{other} + {b}"
        pairs.append((f"{first} − {second}", *diffs))
    return pairs


def verdicts(result: dict, target: str) -> list[str]:
    """The issue's bar, in words, from the paired differences."""
    lines = []
    for label, diff, val in paired_rows(result, target):
        if diff.n == 0:
            continue
        words = diff.verdict(label.split(" − ")[0], label.split(" − ")[1])
        ours = label.startswith(f"{HEADLINE} + ") and not label.startswith(
            f"{HEADLINE} + {CONTROL} "
        )
        if ours and label.endswith(f"{HEADLINE} source only"):
            met = diff.n >= 2 and diff.mean >= 3 and not diff.contains_zero
            lines.append(
                f"- {label}: {diff.summary()} mIoU; bar (≥ +3) {'met' if met else 'not met'}; "
                f"{words}. Source val: {val.summary()} (bar: within 2 mIoU: "
                f"{'met' if val.n and abs(val.mean) <= 2 else 'not met'})."
            )
        else:
            lines.append(f"- {label}: {diff.summary()} mIoU; {words}.")
    return lines


def report(result: dict, proxies: list[dict] | dict | None = None) -> str:
    """The markdown of the "adapt" section of docs/benchmarks.md."""
    parts = [
        "Source runs: bench dg's v2 runs (`configs/bench_dg_tinyvit_camvid.yaml`, 300 "
        "iterations, CamVid day), one per seed; each adaptation uses the run's seed for its image "
        f"order. {result['steps']} adaptation steps of batch 1 for every offline adaptation; "
        "`*-stream` rows are online: the held-out frames in order are the stream, each scored "
        "as predicted before the source-free step on it (one step per frame); `spl` and "
        "`selftrain` are source-free (the defaults: a teacher averaging scales 0.75/1/1.25 and "
        "flips), `spl-replay` and `selftrain-replay` replay the run's labelled source data "
        '(DAFormer-style, docs/methods.md "SPL mode"); `replay-only` is their control: the same '
        "steps on the labelled source crops with no target term (continued source training). "
        "Hyperparameters: `AdaptSettings` "
        "defaults, chosen on the source-side proxy below before any target number was seen; "
        "none was tuned on these labels. Source val: CamVid day val, one frame in "
        f"{result['val_every']}. s/frame: adaptation wall time per adapted frame on this "
        "shared CPU (scoring excluded; for the stream rows prediction and step together). "
        "Intervals: paired by seed, 95 % Student-t; with 3 "
        "seeds only a difference large against its spread excludes 0."
    ]
    if result.get("note"):
        parts.append(result["note"])
    for target in result["targets"]:
        frames = result["frames"].get(target, {})
        rows = [r for r in result["rows"] if r["target"] == target]
        if not rows:
            continue
        table = markdown_table(
            ["run", "seed", "adaptation", "target held-out mIoU", "source val mIoU", "resets",
             "adapted params", "s/frame"],
            [
                [r["run"], r["seed"], r["adaptation"], f"{r['miou']:.2f}",
                 f"{r['source_val']:.2f}", r.get("resets", ""), r.get("adapted_params", ""),
                 r.get("sec_per_frame", "")]
                for r in sorted(rows, key=lambda r: (r["run"], r["adaptation"], r["seed"]))
            ],
        )  # fmt: skip
        paired = markdown_table(
            ["comparison", "target Δ mIoU [95 % CI]", "source val Δ [95 % CI]", "seeds"],
            [[label, d.summary(), v.summary(), d.n] for label, d, v in paired_rows(result, target)],
        )
        parts.append(
            f"### {target}: {TARGETS[target]}\n\n{frames.get('adapt', '?')} unlabelled frames "
            f"adapted on, {frames.get('score', '?')} held-out frames scored (whole image).\n\n"
            f"{table}\n\nPaired by seed:\n\n{paired}\n\n" + "\n".join(verdicts(result, target))
        )
    if isinstance(proxies, dict):
        proxies = [proxies]
    if proxies:
        if __package__:
            from bench.adapt_proxy import report as proxy_report
        else:  # run as a script, bench/ is sys.path[0]
            from adapt_proxy import report as proxy_report

        parts.append(
            "### Source-side proxy (where the settings come from)\n\n"
            + "\n\n".join(proxy_report(p) for p in proxies)
        )
    return "\n\n".join(parts)


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """--run, --seeds, --targets and --json: the source runs, the targets and the rows' file
    (bench/adapt_oracle.py takes the same)."""
    parser.add_argument("--run", action="append", metavar="NAME=RUN", help="{seed} in RUN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["idd"])
    parser.add_argument("--json", help="rows go here as they finish; a rerun skips them")


def resume_rows(args, script: str, argv) -> dict:
    """The rows already in ``args.json`` (a rerun skips them), with this command appended to
    the commands that wrote them and ``args.targets`` added to theirs."""
    result = {"rows": [], "frames": {}}
    if args.json and Path(args.json).is_file():
        result = json.loads(Path(args.json).read_text())
    command = f"python {script} " + shlex.join(sys.argv[1:] if argv is None else argv)
    command = "; ".join(dict.fromkeys(filter(None, [result.get("command"), command])))
    targets = list(dict.fromkeys([*result.get("targets", []), *args.targets]))
    result.update(command=command, machine=machine(), targets=targets)
    return result


def load_or_run(parser: argparse.ArgumentParser, args, script: str, argv, run_rows) -> dict:
    """The rows of ``--from-json``; or those of ``--json`` (:func:`resume_rows`) completed by
    ``run_rows(args, result)`` (bench/adapt_oracle.py and bench/tta.py)."""
    if args.from_json:
        return json.loads(Path(args.from_json).read_text())
    if not args.run:
        parser.error("give --run NAME=RUN (with {seed}) or --from-json FILE")
    result = resume_rows(args, script, argv)
    run_rows(args, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_row_arguments(parser)
    parser.add_argument("--steps", type=int, default=100, help="adaptation steps (default 100)")
    parser.add_argument("--out", default="runs/bench_adapt", help="adapted runs go here")
    parser.add_argument(
        "--methods",
        action="append",
        metavar="NAME=M1,M2",
        help=f"adaptations of run NAME ({', '.join(ADAPTATIONS)}; default spl; NAME= for none)",
    )
    parser.add_argument(
        "--val-every", type=int, default=3, help="score every Nth source val frame (default 3)"
    )
    parser.add_argument(
        "--no-source-only",
        action="store_true",
        help="skip the source-only rows (another --json holds them; merge before --doc)",
    )
    parser.add_argument(
        "--proxy-json",
        action="append",
        help="bench/adapt_proxy.py's --json, shown beside (repeat for several)",
    )
    parser.add_argument(
        "--doc", action="store_true", help='write the "adapt" section of docs/benchmarks.md'
    )
    parser.add_argument(
        "--section",
        default="adapt",
        help="with --doc: the section to write (another one keeps the 'adapt' rows as they are)",
    )
    parser.add_argument("--title", help="with --section: its title")
    parser.add_argument(
        "--note", help="a paragraph printed under the intro, stored in the --json/--from-json file"
    )
    parser.add_argument("--from-json", metavar="FILE", help="report a --json file; run nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    elif args.run:
        result = resume_rows(args, "bench/adapt.py", argv)
        result.update(steps=args.steps, val_every=args.val_every)
        result = run_rows(args, result)
    else:
        parser.error("give --run NAME=RUN (or --from-json FILE)")
    if args.note:  # kept with the rows, so that a re-render from the file prints it too
        result["note"] = args.note
        if args.from_json or args.json:
            Path(args.from_json or args.json).write_text(json.dumps(result, indent=2))
    proxies = [json.loads(Path(p).read_text()) for p in args.proxy_json or []]
    body = report(result, proxies)
    print(body)
    if args.doc:
        title = args.title or "Test-time adaptation (SPL mode, self-training, TENT)"
        commands = "`; `".join([result["command"]] + [p["command"] for p in proxies])
        write_section(args.section, title, commands, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
