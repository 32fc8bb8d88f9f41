"""What DPFT's presence gate and focus gate do on trained runs (source validation frames).

    python bench/dpft_presence.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--images 24]

For each run (a finished ``pivotseg train`` folder of a ``dpft`` model) the last checkpoint is
loaded and run on the first ``--images`` frames of the run's *source validation* split.

* Presence gate, in each block where it acts: the rho of every class it gates, split by whether
  the class is present in the frame (one of its tokens at that block's stride, the pivots' 50%
  rule). Reported: the median rho of present and of absent classes, the bar of issue #12
  (median present >= 0.8 and absent <= 0.2) and the mean over classes of the within-class AUC
  (how often a frame showing the class scores above one without it: 0.5 = no separation beyond
  the class's prior, which the per-class bias alone can learn).
* Focus gate ``g = 1 - S_0``, in each block DPFT refines: the median over patches and the share
  of patches with ``g < 0.5`` (left mostly unchanged).
* Each gate switched off at inference: mean and largest change of the segmentation logits and
  the share of pixels whose predicted class changes.
"""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path

import torch
import torch.nn.functional as F

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.config import load_config
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.dgss.evaluate import open_eval_datasets
from pivotseg.tuning.pivots import patch_classes

ROOT = check_checkout(__file__)

BAR_PRESENT, BAR_ABSENT = 0.8, 0.2
SWITCHES = {"focus gate": "focus_gate", "presence gate": "presence_gating"}


class Recorder:
    """Wraps a DPFT's ``update``, ``_presence`` and ``focus`` to keep what one forward computed."""

    def __init__(self, dpft):
        self.dpft, self.block = dpft, None
        self.rho: list[tuple[int, torch.Tensor, torch.Tensor, tuple[int, int]]] = []
        self.gate: dict[int, torch.Tensor] = {}
        update, presence, focus = dpft.update, dpft._presence, dpft.focus

        def recording_update(index, f, hw):
            self.block = (index, hw)
            return update(index, f, hw)

        def recording_presence(f, index):
            scores, valid, logits, gated = presence(f, index)
            self.rho.append((index, torch.sigmoid(logits[0]), gated, self.block[1]))
            return scores, valid, logits, gated

        def recording_focus(attn):
            g = focus(attn)
            self.gate[self.block[0]] = g[0, :, 0]
            return g

        dpft.update, dpft._presence = recording_update, recording_presence
        dpft.focus = recording_focus

    def clear(self) -> None:
        self.rho.clear()
        self.gate.clear()


@torch.no_grad()
def measure(run_dir: Path, images: int) -> dict:
    cfg = load_config(run_dir / "config.yaml")
    model = load_segmenter(run_dir / "checkpoints" / "last").eval()
    dpft = model.tuning
    if getattr(dpft, "name", "") != "dpft":
        raise SystemExit(f"{run_dir}: not a dpft run")
    dataset = open_eval_datasets([cfg.data.val], cfg.data.eval_resize_short)[cfg.data.val.label]
    strides = model.backbone.block_strides()
    k = dpft.num_classes
    recorder = Recorder(dpft)
    # block -> class -> ([rho where present], [rho where absent])
    rho: dict[int, dict[int, tuple[list[float], list[float]]]] = {}
    gates: dict[int, list[torch.Tensor]] = {}
    changes = {name: [] for name, switch in SWITCHES.items() if getattr(dpft, switch)}
    for i in range(min(images, len(dataset))):
        item = dataset[i]
        image, label = item["image"][None].float(), item["label"][None].long()
        recorder.clear()
        logits = model(image)
        d = model.backbone.size_divisor
        label = F.pad(label, (0, -label.shape[-1] % d, 0, -label.shape[-2] % d), value=255)
        for index, values, gated, hw in recorder.rho:
            classes = patch_classes(label, hw, strides[index], k)
            present = (classes[..., None] == torch.arange(k)).any(1)[0]
            for c in gated.nonzero().flatten().tolist():
                rho.setdefault(index, {}).setdefault(c, ([], []))[0 if present[c] else 1].append(
                    values[c].item()
                )
        for index, g in recorder.gate.items():
            gates.setdefault(index, []).append(g)
        for name in changes:
            switch = SWITCHES[name]
            setattr(dpft, switch, False)
            try:
                other = model(image)
            finally:
                setattr(dpft, switch, True)
            diff = (other - logits).abs()
            flipped = (other.argmax(1) != logits.argmax(1)).float().mean()
            changes[name].append((diff.mean().item(), diff.max().item(), flipped.item()))
    return {"presence": rho, "focus": gates, "changes": changes}


def presence_rows(label: str, rho: dict) -> list[list[str]]:
    rows = []
    for index, per_class in sorted(rho.items()):
        present = [v for p, _ in per_class.values() for v in p]
        absent = [v for _, a in per_class.values() for v in a]
        med_p, med_a = _median(present), _median(absent)
        aucs = [_auc(p, a) for p, a in per_class.values() if p and a]
        met = med_p >= BAR_PRESENT and med_a <= BAR_ABSENT
        rows.append(
            [
                label,
                str(index),
                f"{med_p:.2f} ({len(present)})",
                f"{med_a:.2f} ({len(absent)})",
                "yes" if met else "no",
                f"{sum(aucs) / len(aucs):.2f} ({len(aucs)})" if aucs else "–",
            ]
        )
    return rows


def focus_rows(label: str, gates: dict) -> list[list[str]]:
    rows = []
    for index, values in sorted(gates.items()):
        g = torch.cat(values)
        rows.append([label, str(index), f"{g.median():.3f}", f"{(g < 0.5).float().mean():.3f}"])
    return rows


def change_rows(label: str, changes: dict) -> list[list[str]]:
    rows = []
    for name, values in changes.items():
        v = torch.tensor(values)
        rows.append(
            [
                label,
                name,
                f"{v[:, 0].mean():.2g}",
                f"{v[:, 1].max():.2g}",
                f"{100 * v[:, 2].mean():.2f}",
            ]
        )
    return rows


def _median(values: list[float]) -> float:
    return torch.tensor(values).median().item() if values else math.nan


def _auc(present: list[float], absent: list[float]) -> float:
    p, a = torch.tensor(present)[:, None], torch.tensor(absent)[None]
    return ((p > a).float() + 0.5 * (p == a).float()).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    presence, focus, changes = [], [], []
    for spec in args.runs:
        label, _, path = spec.partition("=")
        result = measure(Path(path), args.images)
        presence += presence_rows(label, result["presence"])
        focus += focus_rows(label, result["focus"])
        changes += change_rows(label, result["changes"])
    body = "\n\n".join(
        [
            f"First {args.images} frames of the source validation split.",
            "Presence gate, per block where it acts: median rho of the classes present / absent "
            "in a frame (over the classes it gates; count in brackets), whether that meets the "
            f"bar (present >= {BAR_PRESENT}, absent <= {BAR_ABSENT}), and the mean over classes "
            "(count in brackets) of the within-class AUC of present against absent frames.",
            markdown_table(
                ["run", "block", "present", "absent", "bar met", "within-class AUC"], presence
            ),
            "Focus gate g = 1 - S_0, per block DPFT refines: median over patches and the share "
            "of patches with g < 0.5.",
            markdown_table(["run", "block", "median g", "share g < 0.5"], focus),
            "Each gate switched off at inference (the trained model otherwise unchanged): mean "
            "and largest |change| of the logits, and the % of pixels whose class changes.",
            markdown_table(
                ["run", "switched off", "mean |dlogit|", "max |dlogit|", "% pixels changed"],
                changes,
            ),
        ]
    )
    print(body)
    command = "python bench/dpft_presence.py " + " ".join(shlex.quote(r) for r in args.runs)
    if args.images != 24:
        command += f" --images {args.images}"
    write_section(
        "dpft_presence", "DPFT presence and focus gates on trained runs (CPU)", command, body
    )


if __name__ == "__main__":
    main()
