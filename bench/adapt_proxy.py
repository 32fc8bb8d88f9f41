"""Source-side proxy for choosing adaptation settings: CamVid day val under other corruptions.

    python bench/adapt_proxy.py --run dpft=RUN [--run rein=RUN] [--variant NAME:k=v,k=v ...] \
        [--seeds 0 1 2] [--steps 100] [--out runs/adapt_proxy] [--json FILE]

Every adaptation hyperparameter and design option of ``pivotseg adapt`` is chosen here, never on
a target's labels. The proxy target is a copy of CamVid day **val** (the source's own validation
sequence, 0016E5) with, per frame, one corruption that none of the real targets uses (the
adverse Seq05VD target has fog, night, rain, snow, motion blur and glare; IDD is another
country): JPEG at quality 8, Gaussian noise, a colour cast (hue, saturation and RGB shifts), or
a 0.3x downscale. Frames are split in time: the first half is adapted on (images only), the
second half is scored, corrupted ("proxy") and clean ("clean", how much adaptation costs on the
source domain). The source runs train on CamVid day train, so the proxy uses nothing the
targets hold.

Each ``--variant`` is ``NAME:setting=value,...`` over :class:`~pivotseg.tasks.adapt.
AdaptSettings` fields (``method``, ``source_replay``, ``adapt_head``, ``lr``, ...); the default
variants are the design questions of docs/methods.md ("SPL mode"). With ``--seeds`` (``{seed}``
in the run's path) every variant runs on each seed's run and the report pairs them by seed:
each variant minus source only and minus the first variant (the reference). Rows go to
``--json`` as they finish; a rerun with the same file skips them. ``--json`` keeps the rows
for ``bench/adapt.py --proxy-json`` (which prints them in docs/benchmarks.md's "adapt" section).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.proxy import proxy_images
from pivotseg.benchmarking.report import machine, markdown_table
from pivotseg.config import EvalConfig
from pivotseg.data import build_dataset
from pivotseg.data.transforms import eval_transforms
from pivotseg.engine.checkpoint import resolve_model_folder
from pivotseg.paths import shared_path
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.adapt import adapt_run
from pivotseg.tasks.dgss.evaluate import evaluate_datasets

ROOT = check_checkout(__file__)

DEFAULT_VARIANTS = (
    "source-free:source_replay=False",
    "replay, dynamic parts only:adapt_head=False",
    "replay + head:",
    "replay + head, lr 5e-4:lr=5e-4",
    "replay + head, no ClassMix:class_mix=False",
)


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:k=v,k=v`` -> ``(NAME, {k: v})``; values are JSON (``teacher_scales=[0.75,1]``:
    commas inside brackets do not split)."""
    name, _, body = text.partition(":")
    settings = {}
    for part in filter(None, re.split(r",(?![^\[]*\])", body)):
        key, value = part.split("=", 1)
        settings[key.strip()] = json.loads(value.lower() if value in ("True", "False") else value)
    return name.strip(), settings


def score(model, clean, corrupt) -> dict:
    datasets = {"proxy": corrupt, "clean": clean}
    record = evaluate_datasets(model, datasets, EvalConfig(mode="whole"))
    return {k: record["targets"][k]["miou"] for k in datasets}


def _row_key(row: dict) -> tuple:
    return row["run"], row.get("seed", 0), row["variant"]


def run_rows(args, result: dict) -> dict:
    """Adapt and score every (run, seed, variant) not yet in ``result`` (rows are written to
    ``--json`` as they finish, so an interrupted proxy resumes)."""
    out = Path(args.out)
    adapt, (clean_s, corrupt_s), _ = proxy_images(out)
    images = [s.image for s in adapt]
    clean = build_dataset(
        shared_path("data", "camvid_day"), "camvid", "val", transform=eval_transforms()
    )
    corrupt = build_dataset(
        shared_path("data", "camvid_day"), "camvid", "val", transform=eval_transforms()
    )
    clean.samples, corrupt.samples = clean_s, corrupt_s
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    result.update(
        adapt_frames=len(images), score_frames=len(corrupt_s), steps=args.steps,
        seeds=args.seeds, machine=machine(),
    )  # fmt: skip
    result.setdefault("rows", [])
    done = {_row_key(r) for r in result["rows"]}
    print(f"proxy: adapt on {len(images)} corrupted frames, score {len(corrupt_s)}", flush=True)

    def keep(row):
        result["rows"].append(row)
        print(row, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    for spec in args.run:
        name, pattern = spec.split("=", 1)
        for seed in args.seeds:
            run = pattern.format(seed=seed)
            todo = [v for v in variants if (name, seed, v[0]) not in done]
            if (name, seed, "source only") not in done:
                model = load_segmenter(resolve_model_folder(run))
                keep({"run": name, "seed": seed, "variant": "source only",
                      **score(model, clean, corrupt)})  # fmt: skip
            for variant, settings in todo:
                folder = out / f"{name}_seed{seed}_{variants.index((variant, settings))}"
                shutil.rmtree(folder, ignore_errors=True)
                # a variant may set its own budget (steps=N), e.g. to ask whether gains grow
                steps = settings.get("steps", args.steps)
                start = time.time()
                adapt_run(
                    run, images, folder, progress=False,
                    **{"steps": args.steps, "seed": seed, **settings},
                )  # fmt: skip
                seconds = time.time() - start
                summary = json.loads((folder / "adapt.json").read_text())
                adapted = load_segmenter(resolve_model_folder(folder))
                keep(
                    {
                        "run": name,
                        "seed": seed,
                        "variant": variant,
                        "settings": settings,
                        "method": summary["method"],
                        **score(adapted, clean, corrupt),
                        "resets": summary["resets"],
                        "steps": steps,
                        "sec_per_frame": round(seconds / (steps or len(images)), 2),
                    }
                )
    return result


def paired_lines(result: dict) -> list[list]:
    """Each variant minus its run's source only and minus the run's first variant (the
    reference), paired by seed, for the proxy and clean scores."""
    from pivotseg.evaluation.paired import paired_difference

    rows = result["rows"]
    lines = []
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        variants = list(dict.fromkeys(r["variant"] for r in mine if r["variant"] != "source only"))

        def values(variant, field, mine=mine):
            return {r.get("seed", 0): r[field] for r in mine if r["variant"] == variant}

        for variant in variants:
            for base in ("source only", variants[0]):
                if base == variant:
                    continue
                d, c = (
                    paired_difference(values(variant, f), values(base, f))
                    for f in ("proxy", "clean")
                )
                lines.append([run, f"{variant} − {base}", d.summary(), c.summary(), d.n])
    return lines


def report(result: dict) -> str:
    """Markdown of the proxy rows (adapted minus source only per run and seed), and with
    several seeds the paired differences."""
    base = {
        (r["run"], r.get("seed", 0)): r for r in result["rows"] if r["variant"] == "source only"
    }
    lines = []
    for r in result["rows"]:
        b = base[r["run"], r.get("seed", 0)]
        adapted = r["variant"] != "source only"
        lines.append(
            [
                r["run"],
                r.get("seed", 0),
                r["variant"] + (f" ({r['method']})" if adapted else ""),
                f"{r['proxy']:.2f}",
                f"{r['proxy'] - b['proxy']:+.2f}" if adapted else "",
                f"{r['clean']:.2f}",
                f"{r['clean'] - b['clean']:+.2f}" if adapted else "",
                r.get("resets", ""),
                r.get("sec_per_frame", ""),
            ]
        )
    table = markdown_table(
        ["run", "seed", "variant", "proxy mIoU", "Δ", "clean mIoU", "Δ", "resets", "s/frame"],
        lines,
    )
    seeds = result.get("seeds", [0])
    text = (
        f"Proxy (bench/adapt_proxy.py, `{result['command']}`): CamVid day val with JPEG / noise "
        f"/ colour-cast / low-resolution corruptions (none of the targets'), "
        f"{result['adapt_frames']} frames adapted on, {result['score_frames']} later frames "
        f"scored corrupted (proxy) and clean; {result['steps']} steps (or a variant's own "
        "`steps`), batch 1, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (each run's seed "
        "is also its adaptation's). Settings were chosen on this table only.\n\n" + table
    )
    if len(seeds) > 1:
        paired = markdown_table(
            ["run", "comparison", "proxy Δ [95 % CI]", "clean Δ [95 % CI]", "seeds"],
            paired_lines(result),
        )
        text += "\n\nPaired by seed (95 % Student-t):\n\n" + paired
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", action="append", required=True, metavar="NAME=RUN", help="{seed} in RUN"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", metavar="NAME:k=v,...")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/adapt_proxy")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    result = {}
    if args.json and Path(args.json).is_file():
        result = json.loads(Path(args.json).read_text())
        if result.get("steps") not in (None, args.steps):
            sys.exit(f"{args.json}: holds rows of {result['steps']} steps; give another --json")
    command = "python bench/adapt_proxy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result["command"] = "; ".join(dict.fromkeys(filter(None, [result.get("command"), command])))
    result = run_rows(args, result)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
