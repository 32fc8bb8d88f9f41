"""Train a segmenter on a source domain, evaluating on unseen target domains as it goes."""

from __future__ import annotations

import os
import shlex
import warnings
from pathlib import Path

import torch

from pivotseg.config import RunConfig, config_differences, load_config, save_config
from pivotseg.engine import Trainer, make_accelerator
from pivotseg.engine.checkpoint import resolve_checkpoint
from pivotseg.engine.distributed import all_gather_objects
from pivotseg.engine.run_folder import RunClaim
from pivotseg.errors import ConfigError
from pivotseg.tasks.dgss.evaluate import evaluate_datasets, open_eval_datasets, spread

__all__ = ["run_folder_of", "spread", "train"]


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


def train(
    cfg: RunConfig,
    resume: str | Path | None = None,
    stop_at: int | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Train ``cfg.model`` on ``cfg.data.source``; returns the run folder.

    Works on one CPU/GPU or, started by ``torchrun``, on several processes and nodes. The run
    folder gets ``config.yaml``, ``env.json``, ``metrics.jsonl`` and ``checkpoints/`` (each a
    folder that :func:`pivotseg.segmenter.load_segmenter` opens). One process at a time trains
    in a folder (:class:`pivotseg.engine.run_folder.RunClaim`); a new run that fails before it
    logged anything leaves the folder as it found it.

    Args:
        cfg: the run configuration.
        resume: a run folder (continues from ``checkpoints/last``) or a checkpoint folder.
        stop_at: stop with a checkpoint after this iteration (the schedule still spans
            ``cfg.train.iterations``), to fit a job into a time limit.
        overwrite: start afresh in a ``cfg.run_dir`` that is not empty: the earlier run's
            files are removed once set-up succeeded; other files there are kept.

    The evaluations score at most ``cfg.eval.limit`` evenly spaced frames of each dataset
    (``None``: every frame).

    Raises:
        RunFolderBusy: another process trains in the folder (its pid, host and start named).
        ConfigError: ``cfg.run_dir`` is not empty (resume it, pass ``overwrite`` or pick
            another folder), or the data and the model disagree on the classes.
        NonFiniteLoss: the loss became NaN/inf.
        TrainingStopped: Ctrl-C or SIGTERM (a checkpoint was saved; the message says how to go
            on).
    """
    if cfg.data.source is None:
        raise ConfigError("data.source is not set; give the training dataset (path, format, split)")
    if resume is not None and overwrite:
        raise ConfigError("--overwrite starts a run afresh and --resume continues one; give one")
    checkpoint = None
    if resume is not None:
        run_dir, checkpoint = run_folder_of(resume)
    else:
        run_dir = Path(cfg.run_dir or "runs/run")
    cfg.run_dir = str(run_dir)
    if cfg.deterministic:
        _set_deterministic()

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.find_unused_parameters)
    claim = RunClaim(
        run_dir, resume=resume is not None, overwrite=overwrite, active=accelerator.is_main_process
    )
    _start_on_every_process(claim)
    with claim:
        _train_in(cfg, run_dir, checkpoint, accelerator, claim, stop_at)
    return run_dir


def _start_on_every_process(claim: RunClaim) -> None:
    """Lock and check the folder on the main process; its refusal stops every process."""
    error = None
    try:
        claim.start()
    except Exception as err:  # any failure: the other processes must not wait for this one
        error = err
    refusal = all_gather_objects(None if error is None else str(error))[0]
    if error is not None:
        raise error
    if refusal is not None:
        raise ConfigError(refusal)


def _train_in(cfg, run_dir, checkpoint, accelerator, claim, stop_at) -> None:
    from pivotseg.data import build_dataset, collate
    from pivotseg.data.rare_classes import rare_class_sampling
    from pivotseg.data.transforms import train_transforms_of
    from pivotseg.segmenter import build_segmenter

    data = cfg.data
    transform = train_transforms_of(data, cfg.seed)
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
    if checkpoint is not None and saved.is_file():
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
    # Backbone, method and head get streams of their own, so that runs of one seed that differ
    # only in the method start from the same head (paired comparisons in bench dg).
    torch.manual_seed(cfg.seed)
    model = build_segmenter(cfg.model, seed=cfg.seed)
    claim.clear_previous()  # only now: a failed set-up keeps the earlier run
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
        resume_hint=shlex.join(
            ["pivotseg", "train", str(run_dir / "config.yaml"), "--resume", str(run_dir)]
        ),
        class_sampling=rare_class_sampling(train_set, data.rare_class_sampling, run_dir),
    )
    trainer.fit(resume=checkpoint, stop_at=stop_at)


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
