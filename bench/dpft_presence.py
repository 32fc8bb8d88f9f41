"""What DPFT's presence gate does on trained runs: rho of present vs absent classes per block.

    python bench/dpft_presence.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--images 24]

For each run (a finished ``pivotseg train`` folder of a ``dpft`` model) the last checkpoint is
loaded and run on the first ``--images`` frames of the run's *source validation* split; at every
block the presence rho of each class with a pivot is recorded and split by whether the class is
present in the frame (one of its tokens at that block's stride, the pivots' 50% rule). A gate
that works gives present classes a high rho and absent ones a low rho.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import write_section  # noqa: E402
from pivotseg.config import load_config  # noqa: E402
from pivotseg.segmenter import load_segmenter  # noqa: E402
from pivotseg.tasks.dgss.evaluate import open_eval_datasets  # noqa: E402
from pivotseg.tuning.pivots import patch_classes  # noqa: E402


@torch.no_grad()
def presence_by_block(run_dir: Path, images: int) -> dict[int, tuple[float, float]]:
    """``{block: (mean rho of present classes, mean rho of absent classes)}``."""
    cfg = load_config(run_dir / "config.yaml")
    model = load_segmenter(run_dir / "checkpoints" / "last").eval()
    dpft = model.tuning
    if getattr(dpft, "name", "") != "dpft" or not dpft.presence_gating:
        raise SystemExit(f"{run_dir}: not a dpft run with presence gating")
    dataset = open_eval_datasets([cfg.data.val], cfg.data.eval_resize_short)[cfg.data.val.label]
    strides = model.backbone.block_strides()
    records: list[tuple[int, torch.Tensor, tuple[int, int]]] = []
    original = dpft.token_log_presence

    def recording(f, index=None, hw=None):
        if index is not None:
            logits, valid = dpft.class_presence_logits(f, index)
            records.append((index, torch.sigmoid(logits).where(valid, torch.nan), hw))
        return original(f, index, hw)

    dpft.token_log_presence = recording
    sums: dict[int, list[float]] = {}
    try:
        for i in range(min(images, len(dataset))):
            item = dataset[i]
            image, label = item["image"][None].float(), item["label"][None].long()
            records.clear()
            model(image)
            d = model.backbone.size_divisor
            pad = (0, -label.shape[-1] % d, 0, -label.shape[-2] % d)
            label = torch.nn.functional.pad(label, pad, value=255)
            for index, rho, hw in records:
                classes = patch_classes(label, hw, strides[index], dpft.num_classes)
                present = (classes[..., None] == torch.arange(dpft.num_classes)).any(1)[0]
                rho = rho[0]
                acc = sums.setdefault(index, [0.0, 0, 0.0, 0])
                keep = ~rho.isnan()
                acc[0] += rho[present & keep].sum().item()
                acc[1] += int((present & keep).sum())
                acc[2] += rho[~present & keep].sum().item()
                acc[3] += int((~present & keep).sum())
    finally:
        dpft.token_log_presence = original
    return {
        i: (a[0] / a[1] if a[1] else math.nan, a[2] / a[3] if a[3] else math.nan)
        for i, a in sorted(sums.items())
    }


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    tables = {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        tables[label] = presence_by_block(Path(path), args.images)
    blocks = sorted({b for t in tables.values() for b in t})
    header = "| run | " + " | ".join(f"block {b}" for b in blocks) + " |"
    rows = [header, "|---" * (len(blocks) + 1) + "|"]
    for label, table in tables.items():
        cells = [" / ".join(_fmt(v) for v in table[b]) if b in table else "–" for b in blocks]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    body = (
        f"Mean presence rho of the classes present / absent in a frame, per block, over the "
        f"first {args.images} frames of the source validation split, over the classes the "
        "gate acts on (a pivot and, with calibration, statistics; – = none). A working gate "
        "keeps present classes high and absent ones low.\n\n" + "\n".join(rows)
    )
    print(body)
    command = "python bench/dpft_presence.py " + " ".join(shlex.quote(r) for r in args.runs)
    if args.images != 24:
        command += f" --images {args.images}"
    write_section("dpft_presence", "DPFT presence gate on trained runs (CPU)", command, body)


if __name__ == "__main__":
    main()
