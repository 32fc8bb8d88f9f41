"""DPFT's ablation grid (methods.md section 2) on the CPU protocol of bench/dg.py.

    python bench/dpft_ablation.py [--seeds 0 1 2] [--out runs/bench_dg] [key=value ...]

Rows: Rein -> Rein with its scale initialised at DPFT's gamma init (0.3) -> DPFT with every
switch off (Rein with W_q/W_k, a per-block gamma and DPFT's blocks) -> + class-structured
prompts with the presence gate (supervised, calibrated, in the last refined block) ->
+ dynamic context U(z) -> + focus gate -> + pivot loss (every mechanism on; DPFT's defaults
since this ablation are the every-switch-off row, docs/methods.md). What DPFT in
every block costs is bench/methods.py's row. Selection, if any, is read off the source val column;
targets are reported, not tuned on.

One seed gives every row the same data order, augmentations and head initialisation, so rows are
compared seed by seed: each row against "rein" and against the row above, with the mean
difference and its 95 % Student-t interval over the seeds (3 seeds by default).
"""

from __future__ import annotations

import argparse
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
from pivotseg.benchmarking.report import write_section
from pivotseg.tuning.dpft import INGREDIENTS

ROOT = check_checkout(__file__)

CONFIG = ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"
OFF = dict.fromkeys(INGREDIENTS, False)
ALL_ON = dict.fromkeys(INGREDIENTS, True)
# Every DPFT row keeps DPFT's defaults for what is not an ingredient: gamma init 0.3, the deepest
# 60% of the blocks, attn_dim 256.
GRID: dict[str, tuple[str, dict]] = {
    "rein": ("rein", {}),
    "rein, scale 0.3": ("rein", {"scale_init": 0.3}),  # bench/dg.py's control row
    "dpft, every switch off": ("dpft", dict(OFF)),
    # Class prompts alone only relabel tokens (docs/methods.md): they enter with the gate.
    "+class prompts, presence gate": (
        "dpft",
        {**OFF, "class_prompts": True, "presence_gating": True},
    ),
    "+dynamic context": (
        "dpft",
        {**OFF, "class_prompts": True, "presence_gating": True, "dynamic_context": True},
    ),
    "+focus gate": ("dpft", {**ALL_ON, "pivot_loss": False}),
    "dpft": ("dpft", dict(ALL_ON)),  # + pivot loss: every mechanism on (switches, off by default)
}


def ablation_pairs(rows: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(each row against the first, each row against the row above it); the second row's
    comparison with the one above is already in the first list."""
    against_first = [(row, rows[0]) for row in rows[1:]]
    against_above = [(row, above) for above, row in zip(rows[1:], rows[2:])]
    return against_first, against_above


def ablation_body(summary: dict, seeds: list[int]) -> str:
    """The section: the main table, the smoke-check note and both paired tables."""
    rows = list(summary)
    against_first, against_above = ablation_pairs(rows)
    first = summary[rows[0]]
    parts = [
        "Same protocol and budget as the 'dg' section (configs/bench_dg_tinyvit_camvid.yaml), "
        f"seeds {seeds}. Each row adds one ingredient to the row above, up to 'dpft', every "
        "DPFT mechanism on; DPFT's defaults are the row 'dpft, every switch off' (the rows and "
        "what each adds: bench/dpft_ablation.py).",
        format_main_table(summary),
        smoke_note(first),
    ]
    if against_first:
        parts.append(PAIRED_INTRO)
        parts.append(
            f"Each row against '{rows[0]}':\n\n" + format_paired(summary, against_first, False)
        )
    if against_above:
        parts.append(
            "Each row against the row above it (what its ingredient adds):\n\n"
            + format_paired(summary, against_above, False)
        )
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    # Shares run folders with bench/dg.py: its rein and dpft runs are these rows' too.
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dg"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    result = run_benchmark(
        BenchPlan(
            config=CONFIG,
            methods=list(GRID),
            seeds=args.seeds,
            out_dir=args.out,
            overrides=args.overrides,
            variants=GRID,
        )
    )
    body = ablation_body(result["summary"], args.seeds)
    command = "python bench/dpft_ablation.py --seeds " + " ".join(map(str, args.seeds))
    write_section(
        "dpft_ablation", "DPFT ablation on CPU (CamVid day -> unseen targets)", command, body
    )


if __name__ == "__main__":
    main()
