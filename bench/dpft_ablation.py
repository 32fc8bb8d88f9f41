"""DPFT's ablation grid (methods.md section 2) on the CPU protocol of bench/dg.py.

    python bench/dpft_ablation.py [--seeds 0] [--out runs/dpft_ablation] [key=value ...]

Rows: Rein -> + class-structured prompts (with the orthogonality penalty, the only thing that
makes them differ from Rein's bank without gating) -> + presence gating -> + dynamic context
U(z) -> + focus gate -> + pivot loss (= full DPFT). Selection, if any, is read off the source
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
GRID: dict[str, tuple[str, dict]] = {
    "rein": ("rein", {}),
    "+class prompts": ("dpft", {**OFF, "class_prompts": True, "ortho_weight": 1e-3}),
    "+presence gating": ("dpft", {**OFF, "class_prompts": True, "presence_gating": True}),
    "+dynamic context": (
        "dpft",
        {**OFF, "class_prompts": True, "presence_gating": True, "dynamic_context": True},
    ),
    "+focus gate": (
        "dpft",
        {
            **OFF,
            "class_prompts": True,
            "presence_gating": True,
            "dynamic_context": True,
            "focus_gate": True,
        },
    ),
    "dpft": ("dpft", {}),  # + pivot loss: the full method
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
        f"seeds {args.seeds}. Each row adds one DPFT ingredient to the row above; the last row "
        "is DPFT with its defaults (+ pivot loss).\n\n" + result["table"].split("\n\nPer-class")[0]
    )
    command = "python bench/dpft_ablation.py --seeds " + " ".join(map(str, args.seeds))
    write_section(
        "dpft_ablation", "DPFT ablation on CPU (CamVid day -> unseen targets)", command, body
    )


if __name__ == "__main__":
    main()
