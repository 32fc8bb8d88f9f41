"""DPFT's gamma_l initialisation, chosen on source validation (docs/methods.md, "gamma_l init").

    python bench/dpft_gamma_sweep.py [--inits 0.001 0.03 0.1 0.3 1.0] [--seeds 0 1 2]
                                     [--out runs/bench_dg] [key=value ...]

One row per initial value: DPFT with its defaults except ``gamma_init``, on the CPU protocol of
bench/dg.py (configs/bench_dg_tinyvit_camvid.yaml). Reported: source val (the selection
criterion) and the targets per row; each row against the first init (methods.md's 1e-3), paired
by seed with the 95 % Student-t interval; and how far gamma moved in training, the mean over
blocks of |gamma_l| in each run's last checkpoint. Targets are shown, never used for the choice.
Writes the "dpft_gamma_sweep" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.benchmark import (
    PAIRED_INTRO,
    BenchPlan,
    format_main_table,
    format_paired,
    run_benchmark,
    smoke_note,
)
from pivotseg.benchmarking.report import markdown_table, write_section

ROOT = check_checkout(__file__)

CONFIG = ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"
INITS = [1e-3, 0.03, 0.1, 0.3, 1.0]


def row_label(init: float) -> str:
    return f"dpft, gamma_init {init:g}"


def trained_gamma(run_dir: str | Path) -> float:
    """Mean over blocks of |gamma_l| in the run's last checkpoint."""
    from safetensors.torch import load_file

    state = load_file(str(Path(run_dir) / "checkpoints" / "last" / "model.safetensors"))
    return float(state["tuning.gamma"].abs().mean())


def sweep_body(summary: dict, gammas: dict[str, list[tuple[int, float]]], seeds: list[int]) -> str:
    """The section: main table, paired differences against the first row, trained gamma."""
    rows = list(summary)
    best = max(rows, key=lambda m: summary[m]["val"][0])
    gamma_rows = [
        [
            row,
            ", ".join(f"{seed}: {g:.3f}" for seed, g in gammas[row]),
            f"{statistics.fmean(g for _, g in gammas[row]):.3f}",
        ]
        for row in rows
    ]
    parts = [
        "Same protocol and budget as the 'dg' section (configs/bench_dg_tinyvit_camvid.yaml), "
        f"seeds {seeds}; DPFT with its defaults except gamma_init. The choice is read off "
        "source val only.",
        format_main_table(summary),
        smoke_note(summary[rows[0]]),
        PAIRED_INTRO,
        f"Each row against '{rows[0]}':\n\n"
        + format_paired(summary, [(row, rows[0]) for row in rows[1:]], False),
        "How far gamma moved: mean over blocks of |gamma_l| after training, per seed.\n\n"
        + markdown_table(["row", "per seed (seed: value)", "mean over seeds"], gamma_rows),
        f"Highest mean source val: {best}. Whether it is reliably above another row is what "
        "the paired source val lines say.",
    ]
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--inits", nargs="+", type=float, default=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dg"))
    args = parser.parse_args()
    variants = {row_label(v): ("dpft", {"gamma_init": v}) for v in args.inits}
    result = run_benchmark(
        BenchPlan(
            config=CONFIG,
            methods=list(variants),
            seeds=args.seeds,
            out_dir=args.out,
            overrides=args.overrides,
            variants=variants,
        )
    )
    gammas: dict[str, list[tuple[int, float]]] = {row: [] for row in variants}
    for run in result["runs"]:
        gammas[run.method].append((run.seed, trained_gamma(run.run_dir)))
    command = "python bench/dpft_gamma_sweep.py --inits " + " ".join(f"{v:g}" for v in args.inits)
    command += " --seeds " + " ".join(map(str, args.seeds))
    write_section(
        "dpft_gamma_sweep",
        "DPFT gamma_l init on source val (CPU)",
        command,
        sweep_body(result["summary"], gammas, args.seeds),
    )


if __name__ == "__main__":
    main()
