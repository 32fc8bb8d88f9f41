"""DPFT's ablation grid (methods.md section 2) on the CPU protocol of bench/dg.py.

    python bench/dpft_ablation.py [--seeds 0] [--out runs/dpft_ablation] [key=value ...]

Rows: Rein -> + class-structured prompts (with the orthogonality penalty, the only thing that
makes them differ from Rein's bank without gating) -> + presence gating (bare formula) ->
+ dynamic context U(z) -> + focus gate -> + pivot loss -> + gamma init 0.3 instead of
methods.md's 1e-3 (= DPFT with its defaults); then one row with an option that is off by
default: per-class presence calibration with the 500-image warm-up pass. Selection, if any, is read off the source
val column; targets are reported, not tuned on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from pivotseg.tasks.dgss.benchmark import BenchPlan, run_benchmark  # noqa: E402

CONFIG = ROOT / "configs" / "bench_dg_tinyvit_camvid.yaml"
OFF = dict(
    class_prompts=False,
    presence_gating=False,
    dynamic_context=False,
    focus_gate=False,
    pivot_loss=False,
)
# methods.md's gamma init: every row but the last keeps it.
G = dict(gamma_init=1e-3)
GRID: dict[str, tuple[str, dict]] = {
    "rein": ("rein", {}),
    "+class prompts": ("dpft", {**OFF, **G, "class_prompts": True, "ortho_weight": 1e-3}),
    "+presence gating": ("dpft", {**OFF, **G, "class_prompts": True, "presence_gating": True}),
    "+dynamic context": (
        "dpft",
        {**OFF, **G, "class_prompts": True, "presence_gating": True, "dynamic_context": True},
    ),
    "+focus gate": ("dpft", {**G, "pivot_loss": False}),
    "+pivot loss": ("dpft", dict(G)),
    "dpft": ("dpft", {}),  # + gamma init 0.3: DPFT with its defaults
    # An option, not in the defaults: per-class presence calibration with the warm-up pass.
    "+presence calibration, warm-up": (
        "dpft",
        {"presence_calibration": True, "warmup_images": 500},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    # Shares run folders with bench/dg.py: its rein and dpft runs are these rows' too.
    parser.add_argument("--out", type=Path, default=Path("runs/bench_dg"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
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
    body = (
        "Same protocol and budget as the 'dg' section (configs/bench_dg_tinyvit_camvid.yaml), "
        f"seeds {args.seeds}. Each row adds one DPFT ingredient to the row above, up to 'dpft', "
        "DPFT with its defaults (+ gamma init 0.3); the row after it adds an option that is off "
        "by default (per-class presence calibration and the 500-image warm-up).\n\n"
        + result["table"].split("\n\nPer-class")[0]
    )
    command = "python bench/dpft_ablation.py --seeds " + " ".join(map(str, args.seeds))
    write_section(
        "dpft_ablation", "DPFT ablation on CPU (CamVid day -> unseen targets)", command, body
    )


if __name__ == "__main__":
    main()
