"""Headroom of test-time adaptation: a target-label oracle beside source only.

    python bench/adapt_oracle.py --run dpft=RUNS/dpft/seed{seed} [--run rein=...] \
        --seeds 0 1 2 --targets idd adverse --steps 40 200 --json FILE [--doc]
    python bench/adapt_oracle.py --from-json FILE --doc   # re-render only

An adaptation from unlabelled images can at best do what its student would do if every
pseudo-label were right. This trains that student with the TRUE labels of the half of each target
that bench/adapt.py adapts on (its split: IDD Lite by sequence, adverse Seq05VD by time) and scores
the held-out half and source val as bench/adapt.py does, so the rows pair by seed with its
source-only rows. It is a reference, never a setting: nothing here feeds ``AdaptSettings``.

Rows, for each ``--steps`` N:

* ``oracle, N steps``: the offline default's student (``AdaptSettings``' source-free defaults: the
  tuning method's adaptable parameters and every normalisation layer's affine ones; Adam at its
  learning rate; batch 1; whole frames at the adaptation's size; the run's seed orders the frames);
* ``oracle + head, N steps``: the same with the head's parameters added (the replay recipe's
  student).

Loss: cross-entropy on the labels. IDD Lite is labelled in its own 7 classes: the model's
probabilities are summed into them (:func:`pivotseg.data.taxonomy.convert_logits`, the quantity
its score is computed from) and pixels of classes the model cannot reach are ignored. The head's
class weights of source training are not used (one frame per step, no class balance to keep).

If the oracle gains less than 3 mIoU with a student and budget, perfect pseudo-labels would not
carry that student to the issue's +3 with that budget on this target.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.data import collate
from pivotseg.engine.checkpoint import resolve_model_folder
from pivotseg.evaluation.paired import paired_difference
from pivotseg.heads.base import IGNORE_INDEX
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.adapt import AdaptSettings
from pivotseg.tasks.adapt.params import only_these_require_grad
from pivotseg.tasks.adapt.selftrain import student_parameters
from pivotseg.tasks.dgss.evaluate import TaxonomyBridge

# bench/adapt.py's split, scoring and row bookkeeping (bench/ is sys.path[0] as a script)
adapt = importlib.import_module("bench.adapt" if __package__ else "adapt")

ROOT = check_checkout(__file__)
STUDENTS = {"oracle": False, "oracle + head": True}  # row prefix -> the head in the student
SOURCE = "source only"


def oracle_train(model, labelled, steps: int, seed: int, head: bool) -> list[float]:
    """``steps`` Adam steps of the default student of ``model`` on ``labelled`` (frames and
    labels, evaluation transforms), one frame per step in a seeded order; the losses."""
    settings = AdaptSettings().resolved(replay=False)
    params = student_parameters(model, head, settings.adapt_norms)
    optimizer = torch.optim.Adam(params.values(), lr=settings.lr)
    classes = getattr(model.config, "class_names", None)
    bridge = TaxonomyBridge(classes, model.config.num_classes, labelled.classes, "oracle")
    rng = np.random.default_rng([seed, 11])
    order = np.concatenate(
        [rng.permutation(len(labelled)) for _ in range(-(-steps // len(labelled)))]
    )[:steps]
    device = next(model.parameters()).device
    model.eval()  # the student's mode in self-training (TinyViT's norms keep their statistics)
    losses = []
    with only_these_require_grad(model, list(params.values())), torch.enable_grad():
        for index in order.tolist():
            batch = collate([labelled[index]])
            labels = batch["label"].long().to(device)
            logits = model(batch["image"].float().to(device)).float()
            # labels keep the dataset's size (the frame is resized), as scoring compares them
            logits = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=False)
            logits, labels = bridge(logits, labels)
            if not (labels != IGNORE_INDEX).any():
                continue
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return losses


def run_rows(args, result: dict) -> None:
    """Score source only and train + score every oracle row not yet in ``result``."""
    val = adapt.source_val(args.val_every)
    done = {(r["target"], r["run"], r["seed"], r["adaptation"]) for r in result["rows"]}
    runs = [spec.split("=", 1) for spec in args.run]
    for target in args.targets:
        labelled, datasets, _ = adapt.target_sets(args, target, val)
        scored = len(datasets["target"])
        result["frames"][target] = {"adapt": len(labelled), "score": scored}
        print(f"{target}: oracle on {len(labelled)} labelled frames, score {scored}")
        for seed in args.seeds:
            for name, pattern in runs:
                run = resolve_model_folder(pattern.format(seed=seed))
                wanted = [SOURCE] + [f"{s}, {n} steps" for n in args.steps for s in STUDENTS]
                for adaptation in wanted:
                    key = (target, name, seed, adaptation)
                    if key in done:
                        continue
                    model = load_segmenter(run)
                    row = {"target": target, "run": name, "seed": seed, "adaptation": adaptation}
                    if adaptation != SOURCE:
                        prefix, steps = adaptation.split(", ")
                        start = time.time()
                        losses = oracle_train(
                            model, labelled, int(steps.split()[0]), seed, STUDENTS[prefix]
                        )
                        row["seconds"] = round(time.time() - start, 1)
                        ends = (losses[:5], losses[-5:])
                        row["loss_first_last"] = [round(float(np.mean(x)), 4) for x in ends]
                    row.update(adapt.score(model, datasets))
                    result["rows"].append(row)
                    done.add(key)
                    print(row, flush=True)
                    if args.json:
                        Path(args.json).write_text(json.dumps(result, indent=2))


def bar_reading(diff, source_val) -> str:
    """What an oracle's paired gain says of the issue's bar (+3 mIoU on the target, source val
    within 2 of before), in words; ``source_val`` is the paired change of source val."""
    if diff.high < 3:
        return (
            "below +3 even at the top of its interval: perfect pseudo-labels would not carry "
            "this student to the bar with this budget"
        )
    if diff.mean >= 3:
        reach = "+3 or more on average"
    else:
        reach = "below +3 on average, though its interval reaches above it"
    if source_val.mean < -2:
        return (
            f"{reach}; source val falls by {-source_val.mean:.2f}, beyond the bar's limit of 2 "
            "(the gain costs the source domain)"
        )
    if diff.mean >= 3:
        return f"{reach}: the bar is within this student's reach at this budget"
    return reach


def _row_order(row: dict) -> tuple:
    """Source only first, then each student by its budget (40 before 200)."""
    prefix, _, steps = row["adaptation"].partition(", ")
    return row["run"], prefix != SOURCE, prefix, int(steps.split()[0]) if steps else 0


def report(result: dict) -> str:
    """The markdown of the "adapt_oracle" section of docs/benchmarks.md."""
    parts = [
        "How much an adaptation of the default student could gain at best: the student trained "
        "with the true labels of the adapted half of each target (bench/adapt.py's split; "
        "what each row trains: bench/adapt_oracle.py), scored on the held-out half. Source "
        "runs: bench dg's v2 DPFT runs (its five ingredients on), made again from the same "
        "config and seeds (the adapt section's were lost with an earlier machine; these "
        "source-only rows agree with that section's to a few hundredths). A reference, not "
        "a method: no setting was taken from it. Intervals: paired by seed, 95 % Student-t."
    ]
    for target in result["targets"]:
        rows = [r for r in result["rows"] if r["target"] == target]
        if not rows:
            continue
        frames = result["frames"].get(target, {})
        table = markdown_table(
            ["run", "seed", "rows", "target held-out mIoU", "source val mIoU", "train s",
             "loss first 5 → last 5"],
            [
                [r["run"], r["seed"], r["adaptation"], f"{r['miou']:.2f}",
                 f"{r['source_val']:.2f}", r.get("seconds", ""),
                 " → ".join(f"{x:.3f}" for x in r["loss_first_last"])
                 if "loss_first_last" in r else ""]
                for r in sorted(rows, key=lambda r: (*_row_order(r), r["seed"]))
            ],
        )  # fmt: skip
        paired, lines = [], []
        firsts = {(r["run"], r["adaptation"]): r for r in rows}
        for run, adaptation in sorted(firsts, key=lambda key: _row_order(firsts[key])):
            if adaptation == SOURCE:
                continue
            diffs = [
                paired_difference(
                    adapt.values_by_seed(rows, target, run, adaptation, f),
                    adapt.values_by_seed(rows, target, run, SOURCE, f),
                )
                for f in ("miou", "source_val")
            ]
            label = f"{run} {adaptation} − {run} {SOURCE}"
            paired.append([label, diffs[0].summary(), diffs[1].summary(), diffs[0].n])
            d = diffs[0]
            if d.n >= 2:
                lines.append(
                    f"- {run}, {adaptation}: with the true labels the student gains "
                    f"{d.summary()} mIoU; {bar_reading(d, diffs[1])}."
                )
        paired_table = markdown_table(
            ["comparison", "target Δ mIoU [95 % CI]", "source val Δ [95 % CI]", "seeds"], paired
        )
        parts.append(
            f"### {target}: {adapt.TARGETS[target]}\n\n{frames.get('adapt', '?')} labelled frames "
            f"trained on, {frames.get('score', '?')} held-out frames scored (whole image).\n\n"
            f"{table}\n\nPaired by seed:\n\n{paired_table}\n\n" + "\n".join(lines)
        )
    return "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    adapt.add_row_arguments(parser)
    parser.add_argument("--steps", type=int, nargs="+", default=[40], help="budgets (default 40)")
    parser.add_argument("--val-every", type=int, default=3, help="source val: every Nth frame")
    parser.add_argument("--doc", action="store_true", help="write the section of the docs")
    parser.add_argument("--from-json", metavar="FILE", help="report a --json file; run nothing")
    args = parser.parse_args(argv)
    result = adapt.load_or_run(parser, args, "bench/adapt_oracle.py", argv, run_rows)
    text = report(result)
    print(text)
    if args.doc:
        write_section(
            "adapt_oracle",
            "Headroom of adaptation: a target-label oracle (CPU)",
            result["command"],
            text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
