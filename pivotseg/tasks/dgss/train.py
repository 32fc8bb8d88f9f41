"""Train a segmenter on a source domain, evaluating on unseen target domains as it goes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from pivotseg.config import RunConfig, config_differences, load_config, save_config
from pivotseg.engine import Trainer, make_accelerator
from pivotseg.engine.checkpoint import resolve_checkpoint
from pivotseg.errors import ConfigError
from pivotseg.tasks.dgss.evaluate import evaluate_datasets, open_eval_datasets


def run_folder_of(resume: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` from a run folder or one of its checkpoints."""
    checkpoint = resolve_checkpoint(resume)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent, checkpoint
    return Path(resume), checkpoint


def _set_deterministic() -> None:
    # cuBLAS needs this to be deterministic; it must be set before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def train(cfg: RunConfig, resume: str | Path | None = None, stop_at: int | None = None) -> Path:
    """Train ``cfg.model`` on ``cfg.data.source``; returns the run folder.

    Works on one CPU/GPU or, started by ``torchrun``, on several processes and nodes. The run
    folder gets ``config.yaml``, ``env.json``, ``metrics.jsonl`` and ``checkpoints/`` (each a
    folder that :func:`pivotseg.segmenter.load_segmenter` opens).

    Args:
        cfg: the run configuration.
        resume: a run folder (continues from ``checkpoints/last``) or a checkpoint folder.
        stop_at: stop with a checkpoint after this iteration (the schedule still spans
            ``cfg.train.iterations``), to fit a job into a time limit.

    Raises:
        ConfigError: ``cfg.run_dir`` holds a run already (resume it or pick another folder), or
            the data and the model disagree on the classes.
        NonFiniteLoss: the loss became NaN/inf.
        TrainingStopped: Ctrl-C or SIGTERM (a checkpoint was saved; the message says how to go
            on).
    """
    from pivotseg.data import build_dataset, collate
    from pivotseg.data.transforms import train_transforms
    from pivotseg.segmenter import build_segmenter

    if cfg.data.source is None:
        raise ConfigError("data.source is not set; give the training dataset (path, format, split)")
    checkpoint = None
    if resume is not None:
        run_dir, checkpoint = run_folder_of(resume)
    else:
        run_dir = Path(cfg.run_dir or "runs/run")
        if (run_dir / "checkpoints" / "last").exists():
            raise ConfigError(
                f"{run_dir}: holds a run already; continue it with --resume {run_dir} or set "
                "run_dir=<another folder>"
            )
    cfg.run_dir = str(run_dir)
    if cfg.deterministic:
        _set_deterministic()

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.find_unused_parameters)
    data = cfg.data
    transform = train_transforms(
        data.crop_size,
        scales=data.scales,
        cat_max_ratio=data.cat_max_ratio,
        flip=data.flip,
        photometric=data.photometric,
        seed=cfg.seed,
        max_size=data.max_size,
    )
    source = data.source
    train_set = build_dataset(
        source.path,
        source.format,
        source.split,
        source.domain,
        transform=transform,
        **source.options,
    )
    _check_classes(cfg, train_set.classes)
    saved = run_dir / "config.yaml"
    if resume is not None and saved.is_file():
        changed = [k for k in config_differences(load_config(saved), cfg) if k != "run_dir"]
        if changed:
            warnings.warn(
                f"resuming {run_dir} with changed settings: {', '.join(changed)} (the optimiser "
                "state, learning rates included, comes from the checkpoint)",
                stacklevel=2,
            )

    eval_specs = ([data.val] if data.val is not None else []) + list(data.targets)
    eval_sets = open_eval_datasets(eval_specs, data.eval_resize_short)
    val_name = data.val.label if data.val is not None else None

    def evaluate(model, iteration):
        return evaluate_datasets(
            model,
            eval_sets,
            cfg.eval,
            accelerator,
            num_workers=data.num_workers,
            val_name=val_name,
        )

    # The same seed on every process: identical initial weights (DDP also broadcasts them).
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.model)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(
        model,
        cfg.train,
        train_set,
        run_dir,
        seed=cfg.seed,
        collate_fn=collate,
        num_workers=data.num_workers,
        evaluate=evaluate if eval_sets else None,
        save_model=model.save,
        accelerator=accelerator,
        resume_hint=f"pivotseg train {run_dir / 'config.yaml'} --resume {run_dir}",
    )
    trainer.fit(resume=checkpoint, stop_at=stop_at)
    return run_dir


def _check_classes(cfg: RunConfig, classes: list[str]) -> None:
    """The model predicts the source's classes; fill in their names for later tools."""
    model = cfg.model
    if model.num_classes != len(classes):
        raise ConfigError(
            f"model.num_classes={model.num_classes} but {cfg.data.source.label} has "
            f"{len(classes)} classes; set model.num_classes={len(classes)}"
        )
    if model.class_names is None:
        model.class_names = list(classes)
    elif list(model.class_names) != list(classes):
        raise ConfigError(
            f"model.class_names differ from the classes of {cfg.data.source.label}; "
            "remove model.class_names to take the dataset's"
        )
