"""Run configuration: nested dataclasses read from YAML, with ``key.sub=value`` overrides.

A run is described by one :class:`RunConfig`::

    model: ...      SegmenterConfig (backbone, tuning method, head)
    data: ...       DataConfig (source, val, targets, augmentation)
    train: ...      TrainConfig (iterations, global batch, optimiser, schedule, precision)
    eval: ...       EvalConfig (whole or sliding-window inference)
    seed, run_dir, deterministic

Values given on the command line are parsed as YAML scalars or lists (``train.lr=6e-5``,
``data.crop_size=[384,384]``); list items are addressed by index (``data.targets.0.split=val``).
A key that does not exist raises a :class:`~pivotseg.errors.ConfigError` naming the closest
valid key. A file may inherit from others with ``_base_:`` (:mod:`pivotseg.config_inherit`).
Relative paths (datasets, ``model.backbone_source``, ``method_args.style_bank``) are looked up
against the current directory first, then the repository root (``../shared/...`` under
``$PIVOTSEG_SHARED`` when set), and stored absolute; ``$VARS`` and ``~`` are expanded.
Numbers such as ``1e-4``, which YAML 1.1 reads as strings, are accepted.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pivotseg.backbones.hub import refuse_unsafe_options
from pivotseg.config_inherit import read_config_file, with_origin
from pivotseg.errors import ConfigError
from pivotseg.naming import hint
from pivotseg.paths import REPO_ROOT
from pivotseg.segmenter import SegmenterConfig
from pivotseg.typed_config import read_dataclass


# ----- the configuration ---------------------------------------------------------------------
@dataclass
class DatasetSpec:
    """One dataset on disk, as :func:`pivotseg.data.build_dataset` opens it.

    Attributes:
        path: the dataset's root folder.
        format: a key of :data:`pivotseg.data.FORMATS` (``cityscapes``, ``gta5``, ``camvid``...).
        split: ``train``/``val``/``test`` (format-specific; ``None`` = the format's default).
        domain: sub-domain where a format has several (ACDC ``fog``/``night``/...).
        name: how results are labelled (default: :attr:`label`).
        resize_short: evaluation only: resize the short image side to this (overrides
            ``data.eval_resize_short``), e.g. 512 for Cityscapes at 1024x512 as Rein does.
        options: the format's own options (cityscapes ``label_kind``, folder ``mapping``...).
        corruptions: evaluation only: read the dataset under these adverse conditions
            (``NAME:SEVERITY``, e.g. ``fog:3``), each frame getting one of them, as
            ``pivotseg data corrupt --mix`` writes it; the copy is made once and cached
            (:func:`pivotseg.data.from_spec.spec_root`).
        corruption_seed: the seed of those corruptions (per frame, and their assignment).
    """

    path: str
    format: str = "folder"
    split: str | None = None
    domain: str | None = None
    name: str | None = None
    resize_short: int | None = None
    options: dict = field(default_factory=dict)
    corruptions: list[str] = field(default_factory=list)
    corruption_seed: int = 0

    @property
    def label(self) -> str:
        """``name``, else the folder name with the domain and split."""
        if self.name:
            return self.name
        parts = [Path(self.path).name or self.format]
        parts += [p for p in (self.domain, self.split) if p]
        return "/".join(parts)

    @classmethod
    def from_string(cls, text: str) -> DatasetSpec:
        """Parse ``[NAME=]PATH[:FORMAT[:SPLIT[:DOMAIN]]]`` (the command-line form)."""
        name = None
        head, sep, rest = text.partition("=")
        if sep and "/" not in head and head:
            name, text = head, rest
        parts = text.split(":")
        if not parts[0] or len(parts) > 4:
            raise ConfigError(
                f"dataset {text!r}: write NAME=PATH[:FORMAT[:SPLIT[:DOMAIN]]], "
                "e.g. cityscapes=/data/cityscapes:cityscapes:val"
            )
        keys = ["path", "format", "split", "domain"]
        values = {k: v for k, v in zip(keys, parts) if v}
        return cls(name=name, **values)


@dataclass
class RareClassSamplingConfig:
    """DAFormer's rare-class sampling (:mod:`pivotseg.data.rare_classes`).

    Attributes:
        temperature: ``T`` in ``P(c) ~ exp((1 - f_c) / T)``, ``f_c`` the class's pixel share in
            the source set; DAFormer's 0.01 nearly ignores frequent classes, larger is flatter.
        min_pixels: an image is drawn for a class when it holds more than this many of its
            pixels (at label resolution; DAFormer's 3000 is for 1914x1052 GTA5 labels).
    """

    temperature: float = 0.01
    min_pixels: int = 3000

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(
                f"data.rare_class_sampling.temperature={self.temperature}: must be above 0 "
                "(DAFormer uses 0.01)"
            )
        if self.min_pixels < 0:
            raise ConfigError(
                f"data.rare_class_sampling.min_pixels={self.min_pixels}: must be at least 0"
            )


@dataclass
class DataConfig:
    """Datasets and augmentation.

    Attributes:
        source: the training set.
        val: evaluated during training for model selection (a split of the source domain);
            reported as ``val`` beside the targets but not part of their mean.
        targets: unseen domains evaluated during and after training.
        crop_size: training crop ``[h, w]`` (an int means square).
        scales: short-edge sizes the random resize picks from (``None`` = Rein's default,
            0.5x to 2x the crop, see :func:`pivotseg.data.transforms.train_transforms`).
        max_size: cap on the long edge after that resize (VLTSeg's 1280x720 resize is
            ``scales: [720]`` with ``max_size: 1280``).
        cat_max_ratio: a crop is re-drawn while one class covers more than this fraction.
        flip: random horizontal flip.
        photometric: mmseg's PhotoMetricDistortion.
        eval_resize_short: resize evaluation images' short side to this (``None`` = as is).
        num_workers: DataLoader processes per training process.
        rare_class_sampling: draw each training sample from a class (rare ones more often),
            then an image and a crop holding it (``None`` = epochs of shuffled images).
    """

    source: DatasetSpec | None = None
    val: DatasetSpec | None = None
    targets: list[DatasetSpec] = field(default_factory=list)
    crop_size: int | list[int] = field(default_factory=lambda: [512, 512])
    scales: list[int] | None = None
    max_size: int | None = 2048
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    eval_resize_short: int | None = None
    num_workers: int = 2
    rare_class_sampling: RareClassSamplingConfig | None = None

    def __post_init__(self):
        if isinstance(self.crop_size, int):
            self.crop_size = [self.crop_size, self.crop_size]
        if len(self.crop_size) != 2:
            raise ConfigError(f"data.crop_size={self.crop_size}: give [h, w] or one number")
        for i, side in enumerate(self.crop_size):
            _at_least(f"data.crop_size.{i}", side, 1)
        for i, scale in enumerate(self.scales or []):
            _at_least(f"data.scales.{i}", scale, 1)
        _at_least("data.max_size", self.max_size, 1)
        _at_least("data.eval_resize_short", self.eval_resize_short, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError(
                f"data.cat_max_ratio={self.cat_max_ratio}: must be in (0, 1] (1 = no limit)"
            )


@dataclass
class TrainConfig:
    """Optimisation. The batch is global: see :func:`pivotseg.engine.optim.accumulation_steps`.

    Attributes:
        iterations: optimiser steps.
        global_batch_size: images per optimiser step over all processes.
        per_device_batch_size: images per forward pass; ``None`` = the whole per-process
            share at once. Smaller values trade speed for memory via gradient accumulation.
        optimizer: ``adamw`` or ``sgd`` (momentum ``momentum``, no Nesterov; FAMix's recipe).
        lr, weight_decay: the base values; per-group multipliers come from the model.
        betas: AdamW's moment decays.
        momentum: SGD's momentum.
        warmup_iters, warmup_ratio: linear warm-up from ``warmup_ratio * lr``.
        poly_power, min_lr: poly decay after the warm-up, down to ``min_lr``.
        grad_clip: max gradient norm (``None`` = no clipping).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (falls back where the device lacks it).
        eval_every, checkpoint_every, log_every: in iterations (0 = only at the end).
        find_unused_parameters: DDP option for models with parameters a step may not use.
    """

    iterations: int = 40000
    global_batch_size: int = 4
    per_device_batch_size: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    eval_every: int = 4000
    checkpoint_every: int = 4000
    log_every: int = 50
    find_unused_parameters: bool = False

    def __post_init__(self):
        for key in ("iterations", "global_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: must be at least 1")
        _at_least("train.warmup_iters", self.warmup_iters, 0)
        if self.warmup_iters >= self.iterations:
            # A short run of a recipe (train.iterations=10) keeps a warm-up and a decay.
            shorter = self.iterations // 10
            _note(
                f"train.warmup_iters={self.warmup_iters} is not below train.iterations="
                f"{self.iterations}; using train.warmup_iters={shorter} (a tenth of the run)"
            )
            self.warmup_iters = shorter
        _at_least("train.per_device_batch_size", self.per_device_batch_size, 1)
        _above("train.lr", self.lr, 0)
        _at_least("train.weight_decay", self.weight_decay, 0)
        _fraction("train.momentum", self.momentum)
        for i, beta in enumerate(self.betas):
            _fraction(f"train.betas.{i}", beta)
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1]")
        _at_least("train.poly_power", self.poly_power, 0)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr}: must be in [0, train.lr={self.lr}]")
        _above("train.grad_clip", self.grad_clip, 0)
        for key in ("eval_every", "checkpoint_every"):
            _at_least(f"train.{key}", getattr(self, key), 0)


@dataclass
class EvalConfig:
    """Inference used for evaluation (and the default of ``pivotseg predict``).

    Attributes:
        mode: ``whole`` (one pass per image) or ``slide`` (overlapping crops, averaged).
        crop, stride: sliding window ``[h, w]`` (ints mean square); Rein: 512/341 at 512.
        batch_size: crops per forward pass in ``slide`` mode.
        limit: score at most this many evenly spaced frames of each evaluated dataset, for
            short runs (``None`` = every frame); the results record it.
        tta_scales: test-time augmentation (mmseg's multi-scale test, ``img_ratios``): the
            image is segmented at each of these scales (whole or sliding, as ``mode`` says)
            and the softmax averaged at its size. ``[1.0]``: a single scale, no augmentation.
        tta_flip: with each scale, also its horizontal flip (mmseg's ``flip``).
    """

    mode: Literal["whole", "slide"] = "whole"
    crop: int | list[int] = field(default_factory=lambda: [512, 512])
    stride: int | list[int] = field(default_factory=lambda: [341, 341])
    batch_size: int = 4
    limit: int | None = None
    tta_scales: list[float] = field(default_factory=lambda: [1.0])
    tta_flip: bool = False

    def __post_init__(self):
        for key in ("crop", "stride"):
            value = getattr(self, key)
            if isinstance(value, int):
                setattr(self, key, [value, value])
            for i, side in enumerate(getattr(self, key)):
                _at_least(f"eval.{key}.{i}", side, 1)
        _at_least("eval.batch_size", self.batch_size, 1)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(
                f"eval.limit={self.limit}: must be at least 1 (frames per dataset), or null "
                "for every frame"
            )
        self.tta_scales = [float(x) for x in self.tta_scales]
        if not self.tta_scales or any(not 0 < x <= 8 for x in self.tta_scales):
            raise ConfigError(
                f"eval.tta_scales={self.tta_scales}: give one or more scales in (0, 8], e.g. "
                "[0.75, 1.0, 1.25] ([1.0]: no test-time augmentation)"
            )

    @property
    def augmented(self) -> bool:
        """Whether inference averages several views (``tta_scales`` / ``tta_flip``)."""
        return self.tta_flip or self.tta_scales != [1.0]


@dataclass
class RunConfig:
    """One training run: model, data, optimisation, evaluation and where it is written."""

    model: SegmenterConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    run_dir: str | None = None
    deterministic: bool = False

    def __post_init__(self):
        # Every process seeds NumPy with seed + rank, which must stay in [0, 2**32).
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed={self.seed}: must be in [0, 2**31)")
        refuse_unsafe_options(self.model.backbone_config, "model.backbone_config")


_NOTES_GIVEN: set[str] = set()


def _note(text: str) -> None:
    """One line on stderr, once per process, on the main process only (torchrun's RANK)."""
    if text in _NOTES_GIVEN or os.environ.get("RANK", "0") != "0":
        return
    _NOTES_GIVEN.add(text)
    print(f"pivotseg: note: {text}", file=sys.stderr)


def _at_least(key: str, value, low) -> None:
    """ConfigError unless ``value`` is ``None`` or at least ``low`` (NaN fails)."""
    if value is not None and not value >= low:
        raise ConfigError(f"{key}={value}: must be at least {low}")


def _above(key: str, value, low) -> None:
    if value is not None and not value > low:
        raise ConfigError(f"{key}={value}: must be above {low}")


def _fraction(key: str, value) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{key}={value}: must be in [0, 1)")


# ----- loading ---------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (and its ``_base_`` files: :mod:`pivotseg.config_inherit`), apply
    ``key.sub=value`` overrides and build a :class:`RunConfig`.

    ``run_dir`` defaults to ``runs/<file stem>`` of ``path`` (not of its bases).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    data, origins = read_config_file(path)
    data.setdefault("run_dir", str(Path("runs") / path.stem))
    try:
        return config_from_dict(data, overrides, where=str(path))
    except ConfigError as err:
        raise with_origin(err, origins, path, overrides) from None


def config_from_dict(
    data: dict, overrides: list[str] | tuple[str, ...] = (), where: str = "config"
) -> RunConfig:
    """Build a :class:`RunConfig` from plain data (as YAML gives) plus overrides."""
    data = apply_overrides(data, overrides)
    cfg = read_dataclass(RunConfig, data)
    _resolve_paths(cfg)
    _check_formats(cfg)
    return cfg


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of ``data`` with each ``a.b.c=value`` set (value parsed as YAML)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write key.sub=value, e.g. train.lr=6e-5")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                        f"use an index 0..{len(node) - 1}"
                    )
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def resolve_path(text: str | None) -> str | None:
    """Expand ``$VARS``/``~``; ``../shared/...`` goes under ``$PIVOTSEG_SHARED`` when that is
    set; another relative path that exists under the current directory or the repository root
    becomes absolute. Anything else (hub ids, missing paths) stays as given."""
    if text is None:
        return None
    expanded = os.path.expanduser(os.path.expandvars(text))
    path = Path(expanded)
    if path.is_absolute():
        return str(path)
    # The shipped configs name the shared folder ../shared; a user who set PIVOTSEG_SHARED
    # means that folder even where a ../shared happens to exist too (and where a file is
    # missing there, the error should name the folder they chose).
    if path.parts[:2] == ("..", "shared") and os.environ.get("PIVOTSEG_SHARED"):
        from pivotseg.paths import shared_dir

        return str(shared_dir().joinpath(*path.parts[2:]).resolve())
    for base in (Path.cwd(), REPO_ROOT):
        if (base / path).exists():
            return str((base / path).resolve())
    return expanded


def _method_path_args(method: str) -> tuple[str, ...]:
    """The arguments of tuning method ``method`` that name files (its ``path_args``)."""
    # Imported on use: the tuning package imports every method (peft among them).
    from pivotseg.tuning import METHODS

    return getattr(METHODS.get(method), "path_args", ())


def _resolve_paths(cfg: RunConfig) -> None:
    cfg.model.backbone_source = resolve_path(cfg.model.backbone_source)
    args = cfg.model.method_args
    if any(isinstance(value, str) for value in args.values()):
        for key in _method_path_args(cfg.model.method):
            if isinstance(args.get(key), str):
                args[key] = resolve_path(args[key])
    specs = [cfg.data.source, cfg.data.val, *cfg.data.targets]
    for spec in specs:
        if spec is not None:
            spec.path = resolve_path(spec.path)


def _check_formats(cfg: RunConfig) -> None:
    try:
        from pivotseg.data import FORMATS
    except ImportError:  # the data package checks again when it opens the dataset
        return
    named = [("data.source", cfg.data.source), ("data.val", cfg.data.val)]
    named += [(f"data.targets.{i}", t) for i, t in enumerate(cfg.data.targets)]
    for key, spec in named:
        if spec is not None and spec.format not in FORMATS:
            suggestion = hint(spec.format, FORMATS)
            raise ConfigError(f"{key}.format={spec.format!r} is unknown; {suggestion}")


# ----- saving ----------------------------------------------------------------------------------
def config_to_dict(cfg: RunConfig) -> dict:
    """Plain data (lists, not tuples) that :func:`config_from_dict` turns back into ``cfg``."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (``pivotseg train`` reads it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg))
    return path


def config_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume warnings)."""
    out: list[str] = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{prefix}{key}.")
        elif x != y:
            out.append(prefix.rstrip("."))

    walk(config_to_dict(a), config_to_dict(b), "")
    return out


__all__ = [
    "DataConfig",
    "DatasetSpec",
    "EvalConfig",
    "RareClassSamplingConfig",
    "RunConfig",
    "SegmenterConfig",
    "TrainConfig",
    "apply_overrides",
    "config_differences",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "resolve_path",
    "save_config",
]
