"""``pivotseg bench dg``: every tuning method under one budget, several seeds, several targets.

Each (method, seed) run is an ordinary training run (``pivotseg train`` with overrides) started
in a child process, so that its peak memory is its own and a crash or Ctrl-C loses only that
run: finished runs are found again and skipped when the benchmark is started once more, and
interrupted ones are resumed (:mod:`pivotseg.benchmarking.bench_runs` says when a run found again
is reused, resumed, started again or set aside).
Model selection uses the source-side validation split only; targets are reported, never used
to choose anything.

A row is a tuning method on the base config's model (``frozen``, ``rein``...), a variant of one
(:attr:`BenchPlan.variants`), or a model of its own (:attr:`BenchPlan.models`, ``--row
LABEL=MODEL_YAML``): another backbone and head trained on the base config's data, budget, seeds
and targets, e.g. FAMix's CLIP ResNet with DeepLabv3+ beside TinyViT rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pivotseg.benchmarking import bench_runs
from pivotseg.config import (
    DatasetSpec,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from pivotseg.data.from_spec import spec_root
from pivotseg.errors import ConfigError, PivotsegError
from pivotseg.evaluation.paired import PairedDifference, paired_difference

DEFAULT_METHODS = ("frozen", "full", "lora", "rein", "dpft")
# Targets with fewer frames are smoke checks: their own columns, outside the headline mean (one
# Cityscapes frame would move the mean by its own noise).
HEADLINE_MIN_FRAMES = 100


@dataclass
class RunResult:
    method: str
    seed: int
    run_dir: str
    val_miou: float
    targets: dict[str, float]
    mean_miou: float
    per_class: dict[str, list[float]]
    trainable: int
    sec_per_iter: float
    peak_memory_mb: float


@dataclass
class BenchPlan:
    """What to run: the base config (model, data, budget) varied by method and seed."""

    config: Path
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    targets: list[DatasetSpec] = field(default_factory=list)
    out_dir: Path = Path("runs/bench_dg")
    overrides: list[str] = field(default_factory=list)
    # Rows may be variants of one method: label -> (tuning method, its arguments).
    variants: dict[str, tuple[str, dict]] = field(default_factory=dict)
    # Evaluate on this many evenly spaced frames per dataset (``--quick``, ``--limit``), passed
    # to every run as ``eval.limit``; None = the base config's eval.limit (default: all).
    eval_frames: int | None = None
    # Runs found in out_dir with other settings: move them aside and train again (else refuse).
    rerun: bool = False
    # Rows may bring their own model: label -> a ``model:`` section replacing the base's
    # (method and head included); data, budget, seeds and targets stay the base's.
    models: dict[str, dict] = field(default_factory=dict)


def load_row_model(path: str | Path, label: str = "row") -> dict:
    """The ``model:`` section of a row file (``--row LABEL=MODEL_YAML``), checked and resolved.

    The file holds only a ``model:`` mapping (what :class:`pivotseg.segmenter.SegmenterConfig`
    takes); paths in it follow the config rules (current folder, then the repository root).

    Raises:
        ConfigError: the file is missing, not YAML, has no ``model:`` mapping or other
            sections, or the model section is invalid (unknown key, missing num_classes...).
    """
    path = Path(path)
    where = f"--row {label}={path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file; give a YAML file with a model: section")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(
            f"{where}: needs a model: section (backbone, method, head...) that replaces the base "
            "config's model"
        )
    others = sorted(str(k) for k in data if k != "model")
    if others:
        raise ConfigError(
            f"{where}: only model: is read, found {', '.join(others)} too; a row keeps the base "
            "config's data, budget and seeds"
        )
    try:
        cfg = config_from_dict({"model": data["model"]}, where=str(path))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config_to_dict(cfg)["model"]


def _child_main(config: str, overrides: list[str], result_file: str, options: dict) -> int:
    """Run inside the child: train (``options``: resume, overwrite, eval_frames, recorded for
    the bookkeeping; the run's ``eval.limit`` applies it), then write peak memory next to the
    run's metrics. Returns the exit code; errors are one line."""
    import resource

    import torch

    from pivotseg.engine import TrainingStopped
    from pivotseg.tasks.dgss.train import train

    try:
        cfg = load_config(config, overrides)
        resume = cfg.run_dir if options["resume"] else None
        run_dir = train(cfg, resume=resume, overwrite=options["overwrite"])
    except TrainingStopped as stop:
        print(f"pivotseg: {stop}", file=sys.stderr)
        return 130
    except PivotsegError as err:
        print(f"pivotseg: error: {err}", file=sys.stderr)
        return 2
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    info = {
        "run_dir": str(run_dir),
        "peak_memory_mb": peak_mb,  # of this process: after a resume, of the resumed part
        "resumed": bool(options["resume"]),
        "eval_frames": options["eval_frames"],
    }
    Path(result_file).write_text(json.dumps(info))
    return 0


def _yaml_value(value) -> str:
    """One-line YAML that an override reads back exactly (JSON would write ``1e-05``, which
    YAML 1.1 reads as a string)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()


def _overrides_for(plan: BenchPlan, label: str, seed: int, run_dir: Path) -> list[str]:
    if label in plan.models:
        # After the base overrides: the row's model is used as written (model.* overrides
        # on the command line are meant for the base model).
        model = [f"model={_yaml_value(plan.models[label])}"]
    else:
        method, args = plan.variants.get(label, (label, {}))
        model = [f"model.method={method}", f"model.method_args={_yaml_value(args)}"]
    over = list(plan.overrides) + model + [f"seed={seed}", f"run_dir={run_dir}"]
    if plan.eval_frames is not None:
        over.append(f"eval.limit={plan.eval_frames}")
    if plan.targets:
        specs = [{k: v for k, v in vars(t).items() if v not in (None, {})} for t in plan.targets]
        over.append(f"data.targets={json.dumps(specs)}")
    return over


def _read_metrics(run_dir: Path) -> tuple[dict, list[float]]:
    """Last evaluation record and the logged seconds per iteration of a run folder."""
    last_eval, speeds = None, []
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            if "eval" in rec:
                last_eval = rec["eval"]
            if "sec_per_iter" in rec:
                speeds.append(rec["sec_per_iter"])
    if last_eval is None:
        raise ConfigError(f"{run_dir}/metrics.jsonl: no evaluation record; set train.eval_every")
    return last_eval, speeds


def _trainable_count(cfg: RunConfig) -> int:
    from pivotseg.segmenter import build_segmenter

    model = build_segmenter(cfg.model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _run_dir(plan: BenchPlan, label: str, seed: int) -> Path:
    return plan.out_dir / _slug(label) / f"seed{seed}"


def _run_state(plan: BenchPlan, label: str, seed: int) -> tuple[str, str]:
    run_dir = _run_dir(plan, label, seed)
    wanted = load_config(plan.config, _overrides_for(plan, label, seed, run_dir))
    return bench_runs.run_state(run_dir, wanted, plan.eval_frames)


def run_one(plan: BenchPlan, method: str, seed: int) -> RunResult:
    """The result of row ``method`` with ``seed``: reused, resumed or trained (in a child
    process) as :mod:`~pivotseg.benchmarking.bench_runs` describes."""
    run_dir = _run_dir(plan, method, seed)
    result_file = run_dir / "bench.json"
    overrides = _overrides_for(plan, method, seed, run_dir)
    state, changes = _run_state(plan, method, seed)
    if state == bench_runs.CHANGED:
        if not plan.rerun:
            raise ConfigError(bench_runs.changed_message([(run_dir, changes)], plan.out_dir))
        aside = bench_runs.move_aside(run_dir)
        print(f"bench dg: {run_dir} had other settings ({changes}); moved to {aside}", flush=True)
        state = bench_runs.NEW
    if state == bench_runs.RESUME:
        print(f"bench dg: resuming the interrupted run in {run_dir}", flush=True)
    elif state == bench_runs.RESTART:
        print(
            f"bench dg: {run_dir} holds no checkpoint to resume; training it again there (run "
            "files replaced, other files kept)",
            flush=True,
        )
    if state != bench_runs.FINISHED:
        options = {
            "resume": state == bench_runs.RESUME,
            "overwrite": state == bench_runs.RESTART,
            "eval_frames": plan.eval_frames,
        }
        code = (
            "import sys, json; from pivotseg.benchmarking.benchmark import _child_main; "
            "sys.exit(_child_main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], "
            "json.loads(sys.argv[4])))"
        )
        args = [str(plan.config), json.dumps(overrides), str(result_file), json.dumps(options)]
        proc = subprocess.run([sys.executable, "-c", code, *args])
        if proc.returncode != 0:
            raise ConfigError(
                f"bench dg: the {method} run with seed {seed} failed (exit {proc.returncode}); "
                f"see the output above and {run_dir}"
            )
    info = json.loads(result_file.read_text())
    record, speeds = _read_metrics(run_dir)
    cfg = load_config(plan.config, overrides)
    steady = speeds[1:] or speeds  # the first window holds start-up costs
    return RunResult(
        method=method,
        seed=seed,
        run_dir=str(run_dir),
        val_miou=record.get("val", {}).get("miou", float("nan")),
        targets={k: v["miou"] for k, v in record["targets"].items()},
        mean_miou=record["mean_miou"],
        per_class={k: v["iou"] for k, v in record["targets"].items()},
        trainable=_trainable_count(cfg),
        sec_per_iter=statistics.fmean(steady) if steady else float("nan"),
        peak_memory_mb=info["peak_memory_mb"],
    )


def _slug(label: str) -> str:
    """One safe folder name for a row label (``+focus gate`` -> ``plus_focus_gate``, ``famix
    (random RN50)`` -> ``famix_random_RN50``): no separator, no leading dot, never ``..``."""
    text = label.replace("+", "plus ").strip()
    slug = "".join(c if c.isascii() and (c.isalnum() or c in "-._") else "_" for c in text)
    return re.sub("_+", "_", slug).lstrip("._").rstrip("_")[:100] or "run"


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _mean_of(values: dict[str, float], names: list[str]) -> float:
    finite = [values[n] for n in names if values[n] is not None and not math.isnan(values[n])]
    return statistics.fmean(finite) if finite else float("nan")


def summarise(
    results: list[RunResult],
    frames: dict[str, int] | None = None,
    min_frames: int = HEADLINE_MIN_FRAMES,
) -> dict:
    """Per row: mean and standard deviation over seeds of every reported number.

    ``mean`` (over seeds) and ``per_seed_mean`` are the headline: per seed, the mean mIoU over
    the targets of at least ``min_frames`` frames (``frames``: target -> frame count, from its
    dataset). Smaller targets, and any whose count is unknown, are ``smoke_targets``: reported
    in their own columns, outside the mean. Without ``frames`` every target counts.
    """
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        targets = list(runs[0].targets)
        counts = {t: (frames or {}).get(t) for t in targets}
        headline = [t for t in targets if frames is None or (counts[t] or 0) >= min_frames]
        per_seed_mean = [_mean_of(r.targets, headline) for r in runs]
        summary[method] = {
            "seeds": [r.seed for r in runs],
            "val": _mean_std([r.val_miou for r in runs]),
            "per_seed_val": [r.val_miou for r in runs],
            "targets": {t: _mean_std([r.targets[t] for r in runs]) for t in targets},
            "frames": counts,
            "min_frames": None if frames is None else min_frames,
            "headline_targets": headline,
            "smoke_targets": [t for t in targets if t not in headline],
            "mean": _mean_std(per_seed_mean),
            "per_seed_mean": per_seed_mean,
            "per_class": {
                t: [
                    _mean_std([r.per_class[t][k] for r in runs])[0]
                    for k in range(len(runs[0].per_class[t]))
                ]
                for t in targets
            },
            "trainable": runs[0].trainable,
            "sec_per_iter": _mean_std([r.sec_per_iter for r in runs])[0],
            "peak_memory_mb": max(r.peak_memory_mb for r in runs),
        }
    return summary


def default_pairs(summary: dict, reference: str = "dpft") -> list[tuple[str, str]]:
    """``reference`` against every other row (none when it is not a row)."""
    if reference not in summary:
        return []
    return [(reference, m) for m in summary if m != reference]


def paired_rows(
    summary: dict, pairs: list[tuple[str, str]]
) -> list[tuple[str, str, str, PairedDifference]]:
    """``(a, b, metric, difference)`` of ``a − b`` per seed, for the headline mean of targets
    and for source val, for each pair of rows."""
    rows = []
    for a, b in pairs:
        for metric, key in (("targets", "per_seed_mean"), ("source val", "per_seed_val")):
            per_seed = [dict(zip(summary[m]["seeds"], summary[m][key])) for m in (a, b)]
            rows.append((a, b, metric, paired_difference(*per_seed)))
    return rows


def _fmt(pair: tuple[float, float], seeds: int) -> str:
    """``mean ± std``; with one seed only the value (its spread is unknown, not 0)."""
    mean, std = pair
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.1f}" if seeds < 2 else f"{mean:.1f} ± {std:.1f}"


def _one_seed(summary: dict) -> bool:
    return all(len(row["seeds"]) < 2 for row in summary.values())


def limit_note(row: dict) -> str:
    """A sentence when the evaluations were cut to a few frames per dataset (``--limit``)."""
    if row.get("limit") is None:
        return ""
    return (
        f"Scored on at most {row['limit']} evenly spaced frames per dataset (--limit / "
        "eval.limit), not on the full targets."
    )


def _frames_text(n: int | None) -> str:
    return "frames unknown" if n is None else f"{n} frame" + ("" if n == 1 else "s")


def headline_label(row: dict) -> str:
    """The headline column's name: which targets its mean covers."""
    if row["min_frames"] is None:
        return "mean of targets"
    return f"mean of targets ≥ {row['min_frames']} frames"


def _target_column(row: dict, target: str) -> str:
    if row["min_frames"] is None:
        return target
    smoke = ", smoke check" if target in row["smoke_targets"] else ""
    return f"{target} ({_frames_text(row['frames'][target])}{smoke})"


def smoke_note(row: dict) -> str:
    """A sentence naming the smoke-check targets and why they are outside the mean."""
    if not row["smoke_targets"]:
        return ""
    listed = ", ".join(f"{t} ({_frames_text(row['frames'][t])})" for t in row["smoke_targets"])
    if not row["headline_targets"]:
        return (
            f"No target has {row['min_frames']} frames or more, so there is no headline mean; "
            f"every target is a smoke check: {listed}."
        )
    return (
        f"Smoke checks, outside the mean of targets (under {row['min_frames']} frames): "
        f"{listed}. Their columns say that the model runs on them, not how well it generalises."
    )


def _signed(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.1f}"


PAIRED_INTRO = (
    "Paired differences (row minus row, seed by seed: one seed gives every row the same data "
    "order, augmentations and head initialisation). The interval is the 95 % Student-t "
    "interval of the mean difference over the seeds; when it contains 0, these seeds do not "
    "show a difference either way."
)


def format_paired(summary: dict, pairs: list[tuple[str, str]], intro: bool = True) -> str:
    """Markdown: per-seed differences between rows, their mean and 95 % interval, in words."""
    rows = paired_rows(summary, pairs)
    if not rows:
        return ""
    label = headline_label(summary[rows[0][0]])
    lines = [
        "| comparison | metric | per seed (seed: difference) | mean | 95 % interval | reading |",
        "|" + "---|" * 6,
    ]
    for a, b, metric, d in rows:
        per_seed = ", ".join(f"{s}: {_signed(v)}" for s, v in zip(d.seeds, d.diffs)) or "–"
        interval = "–" if math.isnan(d.low) else f"[{_signed(d.low)}, {_signed(d.high)}]"
        name = label if metric == "targets" else metric
        cells = [f"{a} − {b}", name, per_seed, _signed(d.mean), interval, d.verdict(a, b)]
        lines.append("| " + " | ".join(cells) + " |")
    return (PAIRED_INTRO + "\n\n" if intro else "") + "\n".join(lines)


def format_main_table(summary: dict, cost: bool = True) -> str:
    """Markdown: source val, mIoU per target, the headline mean (mean ± std over seeds; the
    value alone for a row of one seed) and trainable parameters, plus s/iter and peak memory
    with ``cost``."""
    methods = list(summary)
    first = summary[methods[0]]
    targets = list(first["targets"])
    head = ["method", "source val", *(_target_column(first, t) for t in targets)]
    head += [headline_label(first), "trainable"] + (["s/iter", "peak MB"] if cost else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        s = summary[m]
        n = len(s["seeds"])
        cells = [m, _fmt(s["val"], n), *(_fmt(s["targets"][t], n) for t in targets)]
        cells.append(_fmt(s["mean"], n))
        cells.append(f"{s['trainable'] / 1e6:.2f}M")
        if cost:
            cells += [f"{s['sec_per_iter']:.2f}", f"{s['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tables(
    summary: dict,
    class_names: dict[str, list[str]],
    pairs: list[tuple[str, str]] | None = None,
) -> str:
    """Markdown: the main table (mIoU per target, headline mean, cost), the smoke-check note,
    the paired differences (default: DPFT against every other row) and per-class IoU."""
    methods = list(summary)
    first = summary[methods[0]]
    targets = list(first["targets"])
    out = [format_main_table(summary), smoke_note(first), limit_note(first)]
    out.append(format_paired(summary, default_pairs(summary) if pairs is None else pairs))
    for t in targets:
        names = class_names.get(t) or [str(k) for k in range(len(first["per_class"][t]))]
        rows = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for m in methods:
            vals = summary[m]["per_class"][t]
            rows.append(
                f"| {m} | "
                + " | ".join("–" if v is None or math.isnan(v) else f"{v:.1f}" for v in vals)
                + " |"
            )
        over = "one seed" if _one_seed(summary) else "mean over seeds"
        out.append(f"Per-class IoU on {t} ({over}; – = class absent):\n\n" + "\n".join(rows))
    return "\n\n".join(part for part in out if part)


def chart_title(summary: dict) -> str:
    spread = "one seed" if _one_seed(summary) else "mean ± std over seeds"
    return f"Domain generalisation: mIoU per target ({spread})"


def bar_chart(summary: dict, path: Path) -> Path | None:
    """mIoU per method per target (mean ± std over seeds; no error bar for a row of one seed)
    as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summary)
    first = summary[methods[0]]
    targets = list(first["targets"])
    labels = [_target_column(first, t).replace(" (", "\n(", 1) for t in targets]
    labels.append(headline_label(first).replace("mean of targets", "mean of targets\n", 1))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(4 + 1.6 * len(labels), 4.4))
    for i, m in enumerate(methods):
        pairs = [summary[m]["targets"][t] for t in targets] + [summary[m]["mean"]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(labels))]
        errors = [p[1] for p in pairs] if len(summary[m]["seeds"]) > 1 else None
        ax.bar(xs, [p[0] for p in pairs], width, yerr=errors, label=m, capsize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("mIoU (%)")
    # Beside the axes: with many rows an inside legend hides bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(chart_title(summary))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_benchmark(plan: BenchPlan) -> dict:
    """Run (or pick up) every method x seed, then write results.json, table.md and chart.png."""
    base = load_config(plan.config, plan.overrides)
    if plan.eval_frames is None and base.eval.limit is not None:
        plan = dataclasses.replace(plan, eval_frames=base.eval.limit)
    if base.data.source is None:
        raise ConfigError(f"{plan.config}: data.source is not set")
    labels = list(plan.methods)
    if len(set(labels)) != len(labels):
        twice = sorted({m for m in labels if labels.count(m) > 1})
        raise ConfigError(f"bench dg: row {twice[0]!r} is given twice; give each label once")
    if not plan.seeds or len(set(plan.seeds)) != len(plan.seeds):
        raise ConfigError(f"bench dg: seeds {plan.seeds}: give one or more, each once")
    for label in plan.models:
        if label not in labels:
            raise ConfigError(f"bench dg: row {label!r} has a model but is not in the rows")
        # Fail before any training on a model section the base's data cannot take.
        load_config(plan.config, _overrides_for(plan, label, plan.seeds[0], plan.out_dir))
    bench_runs.check_rows(labels, plan.models, plan.variants, _slug)
    states = {(m, s): _run_state(plan, m, s) for m in labels for s in plan.seeds}
    changed = [
        (_run_dir(plan, *key), why)
        for key, (state, why) in states.items()
        if state == bench_runs.CHANGED
    ]
    if changed and not plan.rerun:
        raise ConfigError(bench_runs.changed_message(changed, plan.out_dir))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for spec in plan.targets or base.data.targets:
        spec_root(spec)  # adverse copies are written once, before any run is timed
    results = []
    for method in plan.methods:
        for seed in plan.seeds:
            print(f"bench dg: {method}, seed {seed}", flush=True)
            results.append(run_one(plan, method, seed))
    summary = summarise(results, _evaluated_frames(base, plan))
    for row in summary.values():
        row["limit"] = plan.eval_frames
    class_names = _target_class_names(base, plan, results)
    table = format_tables(summary, class_names)
    (plan.out_dir / "results.json").write_text(
        json.dumps(
            {
                "config": config_to_dict(base),
                "row_models": plan.models,
                "eval_frames": plan.eval_frames,
                "limit": plan.eval_frames,
                "runs": [vars(r) for r in results],
                "summary": summary,
            },
            indent=2,
        )
    )
    (plan.out_dir / "table.md").write_text(table + "\n")
    chart = bar_chart(summary, plan.out_dir / "chart.png")
    return {
        "summary": summary,
        "table": table,
        "chart": chart,
        "out_dir": plan.out_dir,
        "runs": results,
        "class_names": class_names,
    }


def _evaluated_frames(base: RunConfig, plan: BenchPlan) -> dict[str, int]:
    """Frames each target was scored on: fewer than it has with ``plan.eval_frames``."""
    frames = _target_frames(base, plan)
    if plan.eval_frames is None:
        return frames
    return {t: min(n, plan.eval_frames) for t, n in frames.items()}


def _target_class_names(base: RunConfig, plan: BenchPlan, results) -> dict[str, list[str]]:
    from pivotseg.data.from_spec import dataset_from_spec

    specs = plan.targets or base.data.targets
    names = {}
    for spec in specs:
        try:
            ds = dataset_from_spec(spec)
            names[spec.label] = list(ds.classes)
        except Exception:  # names are cosmetic; the numbers are already computed
            continue
    return names


def _target_frames(base: RunConfig, plan: BenchPlan) -> dict[str, int]:
    """Frames per target, counted from its dataset; a target left out has an unknown count and
    stays out of the headline mean."""
    from pivotseg.data.from_spec import dataset_from_spec

    specs = plan.targets or base.data.targets
    frames = {}
    for spec in specs:
        try:
            ds = dataset_from_spec(spec)
        except (PivotsegError, OSError):
            continue
        frames[spec.label] = len(ds)
    return frames
