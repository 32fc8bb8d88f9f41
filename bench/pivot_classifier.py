"""Do DPFT's set pivots hold class knowledge that adaptation could use? (source side only)

    python bench/pivot_classifier.py --run 'dpft=RUN_WITH_{seed}' [--seeds 0 1 2] [--doc]

SPL mode moves the set pivots toward target class means, but in DPFT's forward they act only
through the presence gate, which barely moves the logits (docs/methods.md, "SPL mode"). The
other way pivots could act is the one prototype-based adaptation uses: classify a pixel by its
nearest pivot, or reweight the pseudo-labels by it (ProDA's prototypical rectification, Zhang
et al. 2021: ``p_k * softmax_k(cos(f, P_k) / T)``). That only helps if the nearest-pivot
classifier is itself good, which this script measures, on the source-side proxy of
``bench/adapt_proxy.py`` (CamVid day val under corruptions none of the targets uses; the first
half is the "adaptation" set, the second half is scored, corrupted and clean), never on a target.

Per run (a DPFT run trained with pivots, e.g. the bench's ``/work/runs/bench_dg/dpft/seed{seed}``)
the scored frames are classified by:

* ``head``: the segmenter itself (its usual prediction);
* ``pivots (source)``: the nearest valid pivot (cosine) of each pivot-block token, upsampled
  bilinearly, averaged over the pivot banks;
* ``pivots (spl-moved)``: the same after the pivots moved as ``spl`` moves them over one pass of
  the adaptation half (the source model as teacher, its pixels above ``pseudo_threshold``,
  ``pivot_momentum``, ``pivot_min_tokens``: the defaults of ``AdaptSettings``);
* ``pivots (target means)``: pivots replaced by the class means over the whole adaptation half
  (same confident pixels), where a class has at least ``pivot_min_tokens`` tokens;
* ``rectified T``: the head's softmax times ``softmax_k(cos / T)`` of the source pivots (ProDA).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from pivotseg.benchmarking import check_checkout
from pivotseg.benchmarking.proxy import proxy_images
from pivotseg.benchmarking.report import markdown_table, write_section
from pivotseg.data import build_dataset
from pivotseg.data.transforms import eval_transforms
from pivotseg.engine.checkpoint import resolve_model_folder
from pivotseg.evaluation.metrics import ConfusionMatrix
from pivotseg.heads.base import IGNORE_INDEX
from pivotseg.paths import shared_path
from pivotseg.segmenter import load_segmenter
from pivotseg.tasks.adapt import AdaptSettings
from pivotseg.tasks.adapt.selftrain import move_pivots
from pivotseg.tasks.dgss.evaluate import TaxonomyBridge, score_into
from pivotseg.tuning.pivots import class_pool, patch_classes

ROOT = check_checkout(__file__)

TEMPERATURES = (0.05, 0.1, 0.2)


def pivot_similarity(tuning, size: tuple[int, int], banks: dict) -> torch.Tensor:
    """``(B, K, H, W)`` cosine of each pivot-block token to each valid pivot of ``banks``
    (width -> (pivots, valid)), resized to ``size`` and averaged over the widths; an invalid
    pivot scores -1. Reads the tokens the last forward cached."""
    maps = []
    for width, (feat, hw, _) in tuning.cached_pivot_tokens().items():
        pivots, valid = banks[width]
        cos = F.normalize(feat.float(), dim=-1) @ F.normalize(pivots.float(), dim=-1).T
        cos = cos.masked_fill(~valid, -1.0).transpose(1, 2)
        grid = cos.reshape(cos.shape[0], cos.shape[1], *hw)
        maps.append(F.interpolate(grid, size=size, mode="bilinear", align_corners=False))
    return torch.stack(maps).mean(0)


def source_banks(tuning) -> dict:
    return {int(w): (b.pivots.clone(), b.valid.clone()) for w, b in tuning.pivot_banks.items()}


@torch.no_grad()
def target_banks(model, dataset, settings: AdaptSettings) -> tuple[dict, dict]:
    """``(pivots moved as spl moves them, pivots set to the target class means)`` over one pass
    of ``dataset`` with the source model as teacher; the model's own pivots are left as found."""
    tuning = model.tuning
    kept = source_banks(tuning)
    strides = tuning.backbone.block_strides()
    sums: dict[int, list] = {}
    for i in range(len(dataset)):
        image = dataset[i]["image"][None].float()
        conf, pseudo = F.softmax(model(image).float(), dim=1).max(1)
        labels = torch.where(conf > settings.pseudo_threshold, pseudo, IGNORE_INDEX)
        tokens = tuning.cached_pivot_tokens()
        for width, (feat, hw, index) in tokens.items():
            classes = patch_classes(labels, hw, strides[index], tuning.num_classes, IGNORE_INDEX)
            s, c = class_pool(feat.float(), classes, tuning.num_classes)
            acc = sums.setdefault(width, [0, 0])
            acc[0], acc[1] = acc[0] + s.sum(0), acc[1] + c.sum(0)
        move_pivots(tuning, tokens, labels, settings.pivot_momentum, settings.pivot_min_tokens)
    moved = source_banks(tuning)
    means = {}
    for width, (s, c) in sums.items():
        enough = c >= settings.pivot_min_tokens
        pivots, valid = kept[width]
        mean = s / c.clamp_min(1)[:, None]
        means[width] = (torch.where(enough[:, None], mean, pivots), valid | enough)
    for width, (pivots, valid) in kept.items():  # restore the source pivots
        tuning.pivot_banks[str(width)].pivots.copy_(pivots)
        tuning.pivot_banks[str(width)].valid.copy_(valid)
    return moved, means


@torch.no_grad()
def classify(model, dataset, banks: dict[str, dict]) -> dict[str, float]:
    """mIoU (%) of every classifier on ``dataset``."""
    tuning, k = model.tuning, model.config.num_classes
    bridge = TaxonomyBridge(getattr(model.config, "class_names", None), k, dataset.classes, "proxy")
    names = ["head", *banks, *(f"rectified T={t}" for t in TEMPERATURES)]
    matrices = {n: ConfusionMatrix(len(dataset.classes)) for n in names}
    for i in range(len(dataset)):
        item = dataset[i]
        image, label = item["image"][None].float(), item["label"][None].long()
        logits = model(image).float()
        size = logits.shape[-2:]
        sims = {name: pivot_similarity(tuning, size, b) for name, b in banks.items()}
        score_into(matrices["head"], bridge, logits, label)
        for name, sim in sims.items():
            score_into(matrices[name], bridge, sim, label)
        log_p = F.log_softmax(logits, dim=1)
        for t in TEMPERATURES:  # log of p * softmax(cos / T); argmax is what counts
            rectified = log_p + F.log_softmax(sims["pivots (source)"] / t, dim=1)
            score_into(matrices[f"rectified T={t}"], bridge, rectified, label)
    return {n: 100 * m.compute()["miou"] for n, m in matrices.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, metavar="NAME=RUN", help="{seed} in RUN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/adapt_proxy", help="the proxy's image folder")
    parser.add_argument("--doc", action="store_true", help="write docs/benchmarks.md's section")
    args = parser.parse_args(argv)
    name, pattern = args.run.split("=", 1)
    adapt, (clean_s, corrupt_s), _ = proxy_images(Path(args.out))

    def dataset(samples):
        data = build_dataset(
            shared_path("data", "camvid_day"), "camvid", "val", transform=eval_transforms()
        )
        data.samples = samples
        return data

    adapt_set, sets = dataset(adapt), {"proxy": dataset(corrupt_s), "clean": dataset(clean_s)}
    settings = AdaptSettings().resolved(replay=True)
    rows, results = [], []
    for seed in args.seeds:
        model = load_segmenter(resolve_model_folder(pattern.format(seed=seed))).eval()
        if not getattr(model.tuning, "uses_pivots", False):
            sys.exit(f"{pattern.format(seed=seed)}: a DPFT run trained with pivots is needed")
        moved, means = target_banks(model, adapt_set, settings)
        banks = {
            "pivots (source)": source_banks(model.tuning),
            "pivots (spl-moved)": moved,
            "pivots (target means)": means,
        }
        for split, data in sets.items():
            scores = classify(model, data, banks)
            results.append((seed, split, scores))
            print(seed, split, {k: round(v, 2) for k, v in scores.items()}, flush=True)
    columns = list(results[0][2])
    for split in sets:
        mine = [r for r in results if r[1] == split]
        for seed, _, scores in mine:
            rows.append([name, seed, split, *(f"{scores[c]:.2f}" for c in columns)])
        mean = {c: sum(r[2][c] for r in mine) / len(mine) for c in columns}
        rows.append([name, "mean", split, *(f"{mean[c]:.2f}" for c in columns)])
    table = markdown_table(["run", "seed", "frames", *columns], rows)
    print(table)
    if args.doc:
        command = "python bench/pivot_classifier.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        body = (
            f"mIoU (%) of DPFT's set pivots used as a classifier (nearest pivot by cosine) and "
            f"as ProDA's rectification of the head's softmax, against the head itself, on the "
            f"source-side proxy of bench/adapt_proxy.py ({len(adapt)} corrupted CamVid val "
            f"frames give the target pivots, the {len(corrupt_s)} later frames are scored "
            f"corrupted and clean).\n\n{table}"
        )
        write_section("pivot_classifier", "Set pivots as a classifier", command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
