"""``pivotseg bench dg``: every tuning method under one budget, several seeds, several targets.

Each (method, seed) run is an ordinary training run (``pivotseg train`` with overrides) started
in a child process, so that its peak memory is its own and a crash or Ctrl-C loses only that
run: finished runs are found again and skipped when the benchmark is started once more.
Model selection uses the source-side validation split only; targets are reported, never used
to choose anything.

A row is a tuning method on the base config's model (``frozen``, ``rein``...), a variant of one
(:attr:`BenchPlan.variants`), or a model of its own (:attr:`BenchPlan.models`, ``--row
LABEL=MODEL_YAML``): another backbone and head trained on the base config's data, budget, seeds
and targets, e.g. FAMix's CLIP ResNet with DeepLabv3+ beside TinyViT rows.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pivotseg.config import (
    DatasetSpec,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from pivotseg.errors import ConfigError

DEFAULT_METHODS = ("frozen", "full", "lora", "rein", "dpft")


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


def _child_main(config: str, overrides: list[str], result_file: str) -> None:
    """Run inside the child: train, then write peak memory next to the run's metrics."""
    import resource

    import torch

    from pivotseg.tasks.dgss.train import train

    cfg = load_config(config, overrides)
    run_dir = train(cfg)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    Path(result_file).write_text(json.dumps({"run_dir": str(run_dir), "peak_memory_mb": peak_mb}))


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


def run_one(plan: BenchPlan, method: str, seed: int) -> RunResult:
    run_dir = plan.out_dir / _slug(method) / f"seed{seed}"
    result_file = run_dir / "bench.json"
    overrides = _overrides_for(plan, method, seed, run_dir)
    if not result_file.is_file():
        if run_dir.exists():
            # An unfinished run: start it again from scratch (its folder would refuse a new run).
            import shutil

            shutil.rmtree(run_dir)
        code = (
            "import sys, json; from pivotseg.tasks.dgss.benchmark import _child_main; "
            "_child_main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])"
        )
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", code, str(plan.config), json.dumps(overrides), str(result_file)]
        )
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
    """A folder name for a row label (``+focus gate`` -> ``plus_focus_gate``, ``famix (random
    RN50)`` -> ``famix_random_RN50``)."""
    text = label.replace("+", "plus ").strip()
    slug = "".join(c if c.isalnum() or c in "-._" else "_" for c in text)
    return re.sub("_+", "_", slug).strip("_") or "run"


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(results: list[RunResult]) -> dict:
    """Per method: mean and standard deviation over seeds of every reported number."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        targets = list(runs[0].targets)
        summary[method] = {
            "seeds": [r.seed for r in runs],
            "val": _mean_std([r.val_miou for r in runs]),
            "targets": {t: _mean_std([r.targets[t] for r in runs]) for t in targets},
            "mean": _mean_std([r.mean_miou for r in runs]),
            "per_seed_mean": [r.mean_miou for r in runs],
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


def _fmt(pair: tuple[float, float]) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.1f} ± {std:.1f}"


def format_tables(summary: dict, class_names: dict[str, list[str]]) -> str:
    """Markdown: the main table (mIoU per target, mean, cost) and per-class IoU per target."""
    methods = list(summary)
    targets = list(summary[methods[0]]["targets"])
    head = ["method", "source val", *targets, "mean of targets", "trainable", "s/iter", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        s = summary[m]
        cells = [m, _fmt(s["val"]), *(_fmt(s["targets"][t]) for t in targets), _fmt(s["mean"])]
        cells += [f"{s['trainable'] / 1e6:.2f}M", f"{s['sec_per_iter']:.2f}"]
        cells += [f"{s['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    out = ["\n".join(lines)]
    for t in targets:
        names = class_names.get(t) or [
            str(k) for k in range(len(summary[methods[0]]["per_class"][t]))
        ]
        rows = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for m in methods:
            vals = summary[m]["per_class"][t]
            rows.append(
                f"| {m} | "
                + " | ".join("–" if v is None or math.isnan(v) else f"{v:.1f}" for v in vals)
                + " |"
            )
        out.append(
            f"Per-class IoU on {t} (mean over seeds; – = class absent):\n\n" + "\n".join(rows)
        )
    return "\n\n".join(out)


def bar_chart(summary: dict, path: Path) -> Path | None:
    """mIoU per method per target (mean ± std over seeds) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summary)
    groups = [*summary[methods[0]]["targets"], "mean"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(4 + 1.6 * len(groups), 4))
    for i, m in enumerate(methods):
        pairs = [summary[m]["targets"][g] for g in groups[:-1]] + [summary[m]["mean"]]
        xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [p[0] for p in pairs], width, yerr=[p[1] for p in pairs], label=m, capsize=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("mIoU (%)")
    # Beside the axes: with many rows an inside legend hides bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Domain generalisation: mIoU per target (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_benchmark(plan: BenchPlan) -> dict:
    """Run (or pick up) every method x seed, then write results.json, table.md and chart.png."""
    base = load_config(plan.config, plan.overrides)
    if base.data.source is None:
        raise ConfigError(f"{plan.config}: data.source is not set")
    labels = list(plan.methods)
    if len(set(labels)) != len(labels):
        twice = sorted({m for m in labels if labels.count(m) > 1})
        raise ConfigError(f"bench dg: row {twice[0]!r} is given twice; give each label once")
    for label in plan.models:
        if label not in labels:
            raise ConfigError(f"bench dg: row {label!r} has a model but is not in the rows")
        # Fail before any training on a model section the base's data cannot take.
        seed = plan.seeds[0] if plan.seeds else 0
        load_config(plan.config, _overrides_for(plan, label, seed, plan.out_dir))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for method in plan.methods:
        for seed in plan.seeds:
            print(f"bench dg: {method}, seed {seed}", flush=True)
            results.append(run_one(plan, method, seed))
    summary = summarise(results)
    class_names = _target_class_names(base, plan, results)
    table = format_tables(summary, class_names)
    (plan.out_dir / "results.json").write_text(
        json.dumps(
            {
                "config": config_to_dict(base),
                "row_models": plan.models,
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
    }


def _target_class_names(base: RunConfig, plan: BenchPlan, results) -> dict[str, list[str]]:
    from pivotseg.data import build_dataset

    specs = plan.targets or base.data.targets
    names = {}
    for spec in specs:
        try:
            ds = build_dataset(spec.path, spec.format, spec.split, spec.domain, **spec.options)
            names[spec.label] = list(ds.classes)
        except Exception:  # names are cosmetic; the numbers are already computed
            continue
    return names
