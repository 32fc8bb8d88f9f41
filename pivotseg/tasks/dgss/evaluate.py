"""Evaluation on several target datasets: mIoU per target and their mean.

Every process scores an un-padded shard of each dataset (indices ``rank, rank + W, ...``) into
a confusion matrix; one all-reduce sums them, so the result is exact for any number of
processes. Images may be resized for inference (``resize_short``); logits are resized back to
the label's own size before scoring, as mmseg does. ``eval.limit`` scores at most that many
evenly spaced frames of each dataset (short runs); the results say so (``frames``, ``limit``).
A model trained on one taxonomy can be scored on data labelled in another (CamVid <->
Cityscapes): logits are converted with :func:`pivotseg.data.taxonomy.convert_logits` and label
pixels of classes the model cannot predict are ignored.
"""

from __future__ import annotations

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
    """Logits ``(B, K, H, W)`` of ``model`` on ``images`` by whole-image or sliding inference;
    with test-time augmentation (``eval.tta_scales`` / ``tta_flip``) the log of the views'
    averaged softmax, so that a softmax or an argmax of the result reads the average."""
    if not eval_cfg.augmented:
        return _infer_once(model, images, eval_cfg)
    from pivotseg.evaluation.inference import augmented_probabilities

    probs = augmented_probabilities(
        lambda x: _infer_once(model, x, eval_cfg),
        images,
        eval_cfg.tta_scales,
        flip=eval_cfg.tta_flip,
        min_side=_min_side(model),
    )
    return probs.clamp_min(1e-12).log()


def _min_side(model: nn.Module) -> int:
    """The smallest image side a view may have: an ONNX export's (its sidecar's, and two size
    multiples), else the eager model's coarsest stride."""
    if hasattr(model, "size_multiple"):  # an OnnxSegmenter: it pads to two multiples
        return max(int(model.min_side), 2 * int(model.size_multiple))
    from pivotseg.tasks.dgss.predict import min_input_side  # predict imports this module

    return min_input_side(model)


def _infer_once(model: nn.Module, images: torch.Tensor, eval_cfg: EvalConfig) -> torch.Tensor:
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


class TaxonomyBridge:
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
        ``{"targets": {label: {"miou", "acc", "macc", "iou", "classes", "frames", "limit"}},
        "mean_miou": float}`` plus ``"val"`` when ``val_name`` is given; values in percent,
        NaN IoU for absent classes; ``frames`` were scored (``limit``: ``eval_cfg.limit``).
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
            bridge = TaxonomyBridge(model_classes, num_classes, dataset.classes, label)
            frames = list(range(len(dataset)))
            if eval_cfg.limit is not None:
                frames = spread(frames, eval_cfg.limit)
            mine = shard_indices(len(frames), acc.process_index, acc.num_processes)
            shard = Subset(dataset, [frames[i] for i in mine])
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
                score_into(matrix, bridge, logits, labels)
            matrix.all_reduce()
            results[label] = {
                **as_percent(matrix.compute()),
                "classes": list(dataset.classes),
                "frames": len(frames),
                "limit": eval_cfg.limit,
            }
    finally:
        model.train(was_training)
    record: dict = {}
    if val_name is not None and val_name in results:
        record["val"] = results.pop(val_name)
    record["targets"] = results
    finite = [r["miou"] for r in results.values() if not math.isnan(r["miou"])]
    record["mean_miou"] = sum(finite) / len(finite) if finite else float("nan")
    return record


def spread(items: list, count: int) -> list:
    """``count`` evenly spaced items of ``items`` (all of them if there are no more).

    Evenly spaced rather than the first ones: the frames of a video sequence (CamVid, ACDC)
    change slowly, so the first few would all show the same street.
    """
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def score_into(matrix, bridge: TaxonomyBridge, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Add one batch to ``matrix``: logits resized to the labels' own size (as mmseg does),
    brought to the data's taxonomy, their argmax counted against the labels."""
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    logits, labels = bridge(logits, labels)
    matrix.update(logits.argmax(1), labels)


def as_percent(metrics: dict) -> dict:
    """ConfusionMatrix results as percentages (the tables of DGSS papers)."""

    def pct(x):
        return float(x) * 100.0

    return {
        "miou": pct(metrics["miou"]),
        "acc": pct(metrics["acc"]),
        "macc": pct(metrics["macc"]),
        "iou": [pct(v) for v in metrics["iou"]],
    }


def format_table(record: dict, per_class: bool = False) -> str:
    """A plain-text table: one row per target (and val) with the frames scored, then the mean
    of the targets, a line when ``eval.limit`` cut the datasets short and, with
    ``per_class``, the IoU of every class of each dataset."""
    from pivotseg.evaluation.results import format_per_class, named_scores

    rows = []
    if "val" in record:
        rows.append(("val", record["val"]))
    rows += list(record["targets"].items())
    width = max([len(name) for name, _ in rows] + [len("mean (targets)")])
    lines = [f"{'dataset':<{width}}  {'frames':>6}  {'mIoU':>6}  {'aAcc':>6}  {'mAcc':>6}"]
    for name, m in rows:
        scores = "  ".join(_score(m[key]) for key in ("miou", "acc", "macc"))
        lines.append(f"{name:<{width}}  {m.get('frames', ''):>6}  {scores}")
    lines.append(f"{'mean (targets)':<{width}}  {'':>6}  {_score(record['mean_miou'])}")
    limits = sorted({m["limit"] for _, m in rows if m.get("limit") is not None})
    if limits:
        lines.append(
            f"limited: at most {limits[-1]} frames per dataset, evenly spaced over it "
            "(eval.limit / --limit N); not a full evaluation"
        )
    if per_class:
        for name, m in rows:
            names = m.get("classes") or [str(k) for k in range(len(m["iou"]))]
            title = f"\nper-class IoU on {name} (%; – = absent from labels and predictions):"
            lines.append(format_per_class(named_scores(names, m["iou"]), title))
    return "\n".join(lines)


def _score(value) -> str:
    """Six characters: the percentage, ``–`` when undefined (NaN here, null once logged)."""
    return "     –" if value is None or math.isnan(value) else f"{value:6.2f}"


def results_json(record: dict, **context) -> dict:
    """``record`` (of :func:`evaluate_datasets`) in the schema of
    :mod:`pivotseg.evaluation.results`; ``context`` says what was scored (``checkpoint``)."""
    from pivotseg.evaluation.results import dataset_entry, named_scores, results_document

    datasets = []
    for name, m in record["targets"].items():
        names = m.get("classes") or [str(k) for k in range(len(m["iou"]))]
        entry = dataset_entry(
            name,
            frames=m["frames"],
            limit=m["limit"],
            miou=m["miou"],
            acc=m["acc"],
            macc=m["macc"],
            per_class=named_scores(names, m["iou"]),
        )
        datasets.append(entry)
    return results_document("eval", datasets, record["mean_miou"], **context)


def inference_record(eval_cfg: EvalConfig) -> dict:
    """How the scores were inferred: mode (and window) and test-time augmentation."""
    record = {"mode": eval_cfg.mode}
    if eval_cfg.mode == "slide":
        record.update(crop=list(eval_cfg.crop), stride=list(eval_cfg.stride))
    return {**record, "tta_scales": list(eval_cfg.tta_scales), "tta_flip": eval_cfg.tta_flip}


def as_pair(value: int | Sequence[int]) -> list[int]:
    """``[h, w]`` from one number or a list of one or two."""
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    return value * 2 if len(value) == 1 else value[:2]


def check_limit(value: int | str | None, flag: str = "--limit") -> int | None:
    """A frame limit from the command line: a number of at least 1, or ``all`` (``None``)."""
    if value is None or value == "all":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(value).strip() != str(number):
        raise ConfigError(
            f"{flag} {value}: give a number of frames per dataset of at least 1, or all"
        )
    return number


def eval_config_for(
    run_cfg: RunConfig | None, mode=None, crop=None, stride=None, batch_size=None, limit=None
) -> EvalConfig:
    """The run's ``eval`` section (defaults without a run config) with the given overrides;
    ``limit`` is a number of frames or ``"all"`` (``None`` keeps the run's ``eval.limit``)."""
    values = dict(vars(run_cfg.eval)) if run_cfg is not None else {}
    if mode is not None:
        values["mode"] = mode
    if crop is not None:
        values["crop"] = as_pair(crop)
    if stride is not None:
        values["stride"] = as_pair(stride)
    if batch_size is not None:
        values["batch_size"] = batch_size
    if limit is not None:
        values["limit"] = check_limit(limit)
    return EvalConfig(**values)  # checked again, overrides included


def with_tta(
    eval_cfg: EvalConfig, scales: Sequence[float] | None = None, flip: bool | None = None
) -> EvalConfig:
    """``eval_cfg`` with test-time augmentation overridden (``None`` keeps its own)."""
    values = dict(vars(eval_cfg))
    if scales is not None:
        values["tta_scales"] = list(scales)
    if flip is not None:
        values["tta_flip"] = flip
    return EvalConfig(**values)


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
    limit: int | str | None = None,
    engine: str | None = None,
    tta_scales: Sequence[float] | None = None,
    tta_flip: bool | None = None,
) -> dict:
    """Score a trained segmenter on several datasets at once; prints a table.

    Runs on one device, or sharded over processes under ``torchrun``.

    Args:
        checkpoint_or_run: a run folder (its ``checkpoints/last`` is used), a checkpoint
            folder (``segmenter.json`` + ``model.safetensors``) or an ``.onnx`` export.
        targets: datasets (:class:`DatasetSpec` or ``NAME=PATH[:FORMAT[:SPLIT]]``); default:
            the run's ``data.targets``.
        mode, crop, stride, batch_size: inference (default: the run's ``eval`` section, else
            whole-image).
        resize_short: resize images' short side before inference (default: the run's
            ``data.eval_resize_short``); a spec's own ``resize_short`` wins.
        backbone_source: where the pretrained backbone is, if it moved since training.
        mixed_precision: ``no``/``bf16``/``fp16`` (default: the run's).
        num_workers: DataLoader processes.
        output: also write the results as JSON here, in the schema of
            :mod:`pivotseg.evaluation.results` (docs/evaluation.md).
        verbose: print the table and the per-class IoU (main process only).
        limit: score at most this many evenly spaced frames per dataset; ``"all"`` for every
            frame (default: the run's ``eval.limit``, else every frame).
        engine: ``torch`` or ``onnxruntime`` (:mod:`pivotseg.deploy`; a run is exported
            first); default ``onnxruntime`` for an ``.onnx`` file, else ``torch``.
        tta_scales, tta_flip: test-time augmentation (default: the run's ``eval`` section,
            else none; :class:`~pivotseg.config.EvalConfig`).

    Returns:
        :func:`evaluate_datasets`'s record (percent) plus ``checkpoint`` and ``inference``
        (mode and test-time augmentation).
    """
    from pivotseg.deploy.onnx_runtime import check_engine, is_onnx_file, open_onnx_model
    from pivotseg.segmenter import load_segmenter

    if output is not None:
        check_output_file(output, "--json")  # before the work, not after it
    engine = check_engine(checkpoint_or_run, engine)
    if is_onnx_file(checkpoint_or_run):
        folder, run_cfg = Path(checkpoint_or_run), None
    else:
        folder = resolve_model_folder(checkpoint_or_run)
        run_cfg = find_run_config(folder)
    specs = [DatasetSpec.from_string(t) if isinstance(t, str) else t for t in targets]
    if not specs:
        if run_cfg is None or not run_cfg.data.targets:
            raise ConfigError(
                f"{checkpoint_or_run}: no targets to evaluate; pass --data NAME=PATH:FORMAT:SPLIT"
            )
        specs = list(run_cfg.data.targets)
    eval_cfg = eval_config_for(run_cfg, mode, crop, stride, batch_size, limit)
    if resize_short is None and run_cfg is not None:
        resize_short = run_cfg.data.eval_resize_short
    if mixed_precision is None:
        mixed_precision = run_cfg.train.mixed_precision if run_cfg is not None else "no"

    if engine == "onnxruntime":
        model = open_onnx_model(checkpoint_or_run, backbone_source)
        # The sidecar holds the run's eval section and resize (a bare .onnx has no run config).
        eval_cfg, _ = model.inference_settings(mode, crop, stride, None, None, batch_size, limit)
        if resize_short is None:
            resize_short = model.sidecar["resize"]["eval_resize_short"]
        acc = make_accelerator("no")  # autocast does not reach ONNX Runtime
    else:
        acc = make_accelerator(mixed_precision)
        model = load_segmenter(folder, backbone_source=backbone_source).to(acc.device)
    eval_cfg = with_tta(eval_cfg, tta_scales, tta_flip)
    datasets = open_eval_datasets(specs, resize_short)
    record = evaluate_datasets(model, datasets, eval_cfg, acc, num_workers=num_workers)
    record["checkpoint"] = str(folder)
    record["inference"] = inference_record(eval_cfg)
    if acc.is_main_process:
        if verbose:
            print(format_table(record, per_class=True))
            if eval_cfg.augmented:
                flip = " with flip" if eval_cfg.tta_flip else ""
                scales = ", ".join(f"{s:g}" for s in eval_cfg.tta_scales)
                print(f"test-time augmentation: scales {scales}{flip} (softmax averaged)")
        if output is not None:
            from pivotseg.evaluation.results import write_json

            context = {"checkpoint": str(folder), "inference": record["inference"]}
            write_json(output, results_json(record, **context))
    return record
