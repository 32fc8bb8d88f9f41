"""Evaluation on several target datasets: mIoU per target and their mean.

Every process scores an un-padded shard of each dataset (indices ``rank, rank + W, ...``) into
a confusion matrix; one all-reduce sums them, so the result is exact for any number of
processes. Images may be resized for inference (``resize_short``); logits are resized back to
the label's own size before scoring, as mmseg does. A model trained on one taxonomy can be
scored on data labelled in another (CamVid <-> Cityscapes): logits are converted with
:func:`pivotseg.data.taxonomy.convert_logits` and label pixels of classes the model cannot
predict are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from pivotseg.config import DatasetSpec, EvalConfig, RunConfig
from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
from pivotseg.engine.distributed import make_accelerator
from pivotseg.engine.sampler import shard_indices
from pivotseg.engine.workers import unwrap_worker_errors
from pivotseg.errors import ConfigError
from pivotseg.outputs import check_output_file


def infer_logits(model: nn.Module, images: torch.Tensor, eval_cfg: EvalConfig) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` of ``model`` on ``images`` by whole-image or sliding inference."""
    from pivotseg.evaluation import slide_inference, whole_inference

    if eval_cfg.mode == "slide":
        num_classes = model.config.num_classes
        return slide_inference(
            model,
            images,
            num_classes,
            crop=tuple(eval_cfg.crop),
            stride=tuple(eval_cfg.stride),
            batch_size=eval_cfg.batch_size,
        )
    return whole_inference(model, images)


def open_eval_datasets(
    specs: Sequence[DatasetSpec], resize_short: int | None = None
) -> dict[str, object]:
    """``{label: dataset}`` with the evaluation transform of each spec (labels unique)."""
    from pivotseg.data.from_spec import dataset_from_spec
    from pivotseg.data.transforms import eval_transforms

    out = {}
    for spec in specs:
        short = spec.resize_short if spec.resize_short is not None else resize_short
        label = spec.label
        if label in out:
            raise ConfigError(
                f"two evaluation datasets are both called {label!r}; give each a name"
            )
        out[label] = dataset_from_spec(spec, transform=eval_transforms(short))
    return out


class _TaxonomyBridge:
    """Scores a model of ``model_classes`` on a dataset labelled with ``data_classes``."""

    def __init__(self, model_classes: list[str] | None, num_classes: int, data_classes, label):
        self.identity = model_classes is None or list(model_classes) == list(data_classes)
        if model_classes is None and num_classes != len(data_classes):
            raise ConfigError(
                f"{label}: has {len(data_classes)} classes, the model {num_classes} and no class "
                "names to relate them; evaluate on data of the model's taxonomy"
            )
        if self.identity:
            return
        from pivotseg.data.taxonomy import unmapped_classes

        self.model_classes, self.data_classes = list(model_classes), list(data_classes)
        missing = unmapped_classes(self.model_classes, self.data_classes)
        self.required = [c for c in self.data_classes if c not in missing]
        if not self.required:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            ours = ", ".join(self.model_classes[:5]) + (", ..." if len(model_classes) > 5 else "")
            raise ConfigError(
                f"{label}: no class of the model ({ours}) maps to its classes "
                f"{', '.join(missing[:10])}{more}; "
                "evaluate on a dataset of the model's taxonomy or add the link to "
                "pivotseg.data.taxonomy.TAXONOMY_LINKS"
            )

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor):
        if self.identity:
            return logits, labels
        from pivotseg.data.taxonomy import convert_logits, ignore_unmapped

        logits = convert_logits(logits, self.model_classes, self.data_classes, self.required)
        labels = ignore_unmapped(labels, self.model_classes, self.data_classes)
        return logits, labels


@torch.no_grad()
def evaluate_datasets(
    model: nn.Module,
    datasets: dict[str, object],
    eval_cfg: EvalConfig,
    accelerator=None,
    num_workers: int = 0,
    val_name: str | None = None,
) -> dict:
    """Score ``model`` on each dataset; call on every process (the shards are summed).

    Args:
        model: a :class:`~pivotseg.segmenter.Segmenter` (0-255 images in, logits out).
        datasets: ``{label: SegDataset}`` with evaluation transforms.
        eval_cfg: whole or sliding-window inference.
        accelerator: gives the device, the process and autocast (default: a fresh one).
        num_workers: DataLoader processes.
        val_name: the label of the validation set, reported apart from the targets' mean.

    Returns:
        ``{"targets": {label: {"miou", "acc", "macc", "iou"}}, "mean_miou": float}`` plus
        ``"val"`` when ``val_name`` is given; values in percent, NaN IoU for absent classes.
    """
    from pivotseg.data import collate
    from pivotseg.evaluation import ConfusionMatrix

    acc = accelerator or make_accelerator()
    was_training = model.training
    model.eval()
    device = acc.device
    model_classes = getattr(model.config, "class_names", None)
    num_classes = model.config.num_classes
    results: dict[str, dict] = {}
    try:
        for label, dataset in datasets.items():
            bridge = _TaxonomyBridge(model_classes, num_classes, dataset.classes, label)
            shard = Subset(
                dataset, shard_indices(len(dataset), acc.process_index, acc.num_processes)
            )
            loader = DataLoader(
                shard,
                batch_size=1,  # evaluation images may differ in size
                num_workers=num_workers,
                collate_fn=collate,
                generator=torch.Generator(),  # leave the global generator untouched
            )
            matrix = ConfusionMatrix(len(dataset.classes))
            progress = tqdm(
                loader, desc=f"eval {label}", leave=False, disable=not acc.is_main_process
            )
            for batch in unwrap_worker_errors(progress):
                images = batch["image"].to(device)
                labels = batch["label"].to(device)
                with acc.autocast():
                    logits = infer_logits(model, images, eval_cfg)
                logits = logits.float()
                if logits.shape[-2:] != labels.shape[-2:]:
                    logits = F.interpolate(
                        logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
                    )
                logits, labels = bridge(logits, labels)
                matrix.update(logits.argmax(1), labels)
            matrix.all_reduce()
            results[label] = _percent(matrix.compute())
    finally:
        model.train(was_training)
    record: dict = {}
    if val_name is not None and val_name in results:
        record["val"] = results.pop(val_name)
    record["targets"] = results
    finite = [r["miou"] for r in results.values() if not math.isnan(r["miou"])]
    record["mean_miou"] = sum(finite) / len(finite) if finite else float("nan")
    return record


def _percent(metrics: dict) -> dict:
    """ConfusionMatrix results as percentages (the tables of DGSS papers)."""

    def pct(x):
        return float(x) * 100.0

    return {
        "miou": pct(metrics["miou"]),
        "acc": pct(metrics["acc"]),
        "macc": pct(metrics["macc"]),
        "iou": [pct(v) for v in metrics["iou"]],
    }


def format_table(record: dict) -> str:
    """A plain-text table: one row per target (and val), then the mean of the targets."""
    rows = []
    if "val" in record:
        rows.append(("val", record["val"]))
    rows += list(record["targets"].items())
    width = max([len(name) for name, _ in rows] + [len("mean (targets)")])
    lines = [f"{'dataset':<{width}}  {'mIoU':>6}  {'aAcc':>6}  {'mAcc':>6}"]
    for name, m in rows:
        lines.append(f"{name:<{width}}  {m['miou']:6.2f}  {m['acc']:6.2f}  {m['macc']:6.2f}")
    lines.append(f"{'mean (targets)':<{width}}  {record['mean_miou']:6.2f}")
    return "\n".join(lines)


def as_pair(value: int | Sequence[int]) -> list[int]:
    """``[h, w]`` from one number or a list of one or two."""
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    return value * 2 if len(value) == 1 else value[:2]


def eval_config_for(
    run_cfg: RunConfig | None, mode=None, crop=None, stride=None, batch_size=None
) -> EvalConfig:
    """The run's ``eval`` section (defaults without a run config) with the given overrides."""
    eval_cfg = EvalConfig(**vars(run_cfg.eval)) if run_cfg is not None else EvalConfig()
    if mode is not None:
        eval_cfg.mode = mode
    if crop is not None:
        eval_cfg.crop = as_pair(crop)
    if stride is not None:
        eval_cfg.stride = as_pair(stride)
    if batch_size is not None:
        eval_cfg.batch_size = batch_size
    return eval_cfg


def evaluate(
    checkpoint_or_run: str | Path,
    targets: Sequence[DatasetSpec | str] = (),
    mode: str | None = None,
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    resize_short: int | None = None,
    backbone_source: str | None = None,
    mixed_precision: str | None = None,
    num_workers: int = 0,
    output: str | Path | None = None,
    verbose: bool = True,
) -> dict:
    """Score a trained segmenter on several datasets at once; prints a table.

    Runs on one device, or sharded over processes under ``torchrun``.

    Args:
        checkpoint_or_run: a run folder (its ``checkpoints/last`` is used) or a checkpoint
            folder (``segmenter.json`` + ``model.safetensors``).
        targets: datasets (:class:`DatasetSpec` or ``NAME=PATH[:FORMAT[:SPLIT]]``); default:
            the run's ``data.targets``.
        mode, crop, stride, batch_size: inference (default: the run's ``eval`` section, else
            whole-image).
        resize_short: resize images' short side before inference (default: the run's
            ``data.eval_resize_short``); a spec's own ``resize_short`` wins.
        backbone_source: where the pretrained backbone is, if it moved since training.
        mixed_precision: ``no``/``bf16``/``fp16`` (default: the run's).
        num_workers: DataLoader processes.
        output: also write the results as JSON here.
        verbose: print the table (main process only).

    Returns:
        ``{"targets": {name: {"miou", "acc", "macc", "iou"}}, "mean_miou": float}``, percent.
    """
    from pivotseg.segmenter import load_segmenter

    if output is not None:
        check_output_file(output, "--json")  # before the work, not after it
    folder = resolve_model_folder(checkpoint_or_run)
    run_cfg = find_run_config(folder)
    specs = [DatasetSpec.from_string(t) if isinstance(t, str) else t for t in targets]
    if not specs:
        if run_cfg is None or not run_cfg.data.targets:
            raise ConfigError(
                f"{checkpoint_or_run}: no targets to evaluate; pass --data NAME=PATH:FORMAT:SPLIT"
            )
        specs = list(run_cfg.data.targets)
    eval_cfg = eval_config_for(run_cfg, mode, crop, stride, batch_size)
    if resize_short is None and run_cfg is not None:
        resize_short = run_cfg.data.eval_resize_short
    if mixed_precision is None:
        mixed_precision = run_cfg.train.mixed_precision if run_cfg is not None else "no"

    acc = make_accelerator(mixed_precision)
    model = load_segmenter(folder, backbone_source=backbone_source).to(acc.device)
    datasets = open_eval_datasets(specs, resize_short)
    record = evaluate_datasets(model, datasets, eval_cfg, acc, num_workers=num_workers)
    record["checkpoint"] = str(folder)
    if acc.is_main_process:
        if verbose:
            print(format_table(record))
        if output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(record, indent=2))
    return record
