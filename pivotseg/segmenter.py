"""The segmenter: backbone + tuning method + decode head, with its config and checkpoints.

A checkpoint folder holds ``segmenter.json`` (the :class:`SegmenterConfig`) and
``model.safetensors`` with only what training changed (:meth:`Segmenter.trainable_state_dict`):
the frozen backbone is rebuilt from ``backbone_source`` (a hub id or a local folder). When
there is no source (random backbone, as in tests and toy runs), :meth:`Segmenter.save` stores
the backbone's tensors as well so that the folder still rebuilds the same model.
"""

from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pivotseg.backbones import build_backbone
from pivotseg.backbones.base import Backbone, state_mismatch
from pivotseg.errors import CheckpointError, ConfigError
from pivotseg.heads import HEADS, build_head
from pivotseg.heads.base import IGNORE_INDEX, Head
from pivotseg.naming import hint
from pivotseg.typed_config import read_dataclass

CONFIG_FILE = "segmenter.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class SegmenterConfig:
    """Everything needed to rebuild a segmenter (weights aside).

    Attributes:
        num_classes: K, the classes the head predicts.
        class_names: optional names of the K classes (saved for prediction tools).
        backbone: a key of :data:`pivotseg.backbones.BACKBONES`.
        backbone_source: hub id or local folder of pretrained weights; ``None`` = random.
        backbone_config: architecture settings for the backbone builder.
        backbone_kwargs: other builder arguments (e.g. ``{"patch_size": 16}`` for DINOv2).
        out_indices: backbone blocks fed to the head (default: four spread blocks).
        method: a key of :data:`pivotseg.tuning.METHODS`.
        method_args: the tuning method's constructor arguments.
        head: a key of :data:`pivotseg.heads.HEADS`.
        head_args: the head's constructor arguments.
    """

    num_classes: int
    class_names: list[str] | None = None
    backbone: str = "dinov2"
    backbone_source: str | None = None
    backbone_config: dict = field(default_factory=dict)
    backbone_kwargs: dict = field(default_factory=dict)
    out_indices: list[int] | None = None
    method: str = "frozen"
    method_args: dict = field(default_factory=dict)
    head: str = "fpn"
    head_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"model.num_classes={self.num_classes!r}: give a positive integer")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"model.class_names has {len(self.class_names)} names but num_classes is "
                f"{self.num_classes}; give one name per class or leave class_names empty"
            )
        if self.head not in HEADS:
            raise ConfigError(f"model.head={self.head!r} is unknown; {hint(self.head, HEADS)}")
        if self.backbone_source is not None:
            self.backbone_source = str(self.backbone_source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> SegmenterConfig:
        """Build from a plain dict (``to_dict``'s, or a checkpoint's ``segmenter.json``), each
        value converted to its field's type; errors start with ``where`` (the file or section)
        and name the key (:func:`pivotseg.typed_config.read_dataclass`)."""
        return read_dataclass(cls, data, source=where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Segmenter(nn.Module):
    """Images (0-255 RGB) to per-class logits, plus training and checkpoint helpers.

    Built by :func:`build_segmenter`; holds ``backbone``, ``tuning`` (the method, which
    references the backbone without owning it) and ``head``.
    """

    def __init__(self, config: SegmenterConfig, backbone: Backbone, tuning: nn.Module, head: Head):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tuning = tuning
        self.head = head
        mean, std = backbone.pixel_stats()
        # Constants of the backbone: never part of a checkpoint.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        # The training run's config (set by load_segmenter): predict() follows its eval section
        # and evaluation resize.
        self.run_config = None

    # ----- inference ------------------------------------------------------------------------
    def _features(self, images: torch.Tensor):
        """Normalise, pad bottom/right to the backbone's size divisor, run the backbone."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"segmenter: expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        d = self.backbone.size_divisor
        pad_h, pad_w = -x.shape[-2] % d, -x.shape[-1] % d
        # Padding after normalisation with 0 = the mean colour, as mmseg's data preprocessor.
        x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.backbone(x), (pad_h, pad_w)

    def _run(self, images: torch.Tensor):
        """Backbone (:meth:`_features`) and head."""
        features, pad = self._features(images)
        queries = self.tuning.queries() if self.head.uses_queries else None
        return self.head(features, queries), pad

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for float images ``(B, 3, H, W)`` on the 0-255 scale."""
        h, w = images.shape[-2:]
        outputs, (pad_h, pad_w) = self._run(images)
        return self.head.logits(outputs, (h + pad_h, w + pad_w))[..., :h, :w]

    def predict(
        self,
        image,
        *,
        probabilities: bool = True,
        mode: str | None = None,
        crop: int | tuple[int, int] | None = None,
        stride: int | tuple[int, int] | None = None,
        resize_short: int | None = None,
        max_long: int | None = None,
        tta_scales: tuple[float, ...] | None = None,
        tta_flip: bool | None = None,
    ):
        """Segment one image as ``pivotseg predict`` does, on the model's device.

        Args:
            image: a file path, a PIL image (grey, alpha, palette and 16-bit images are
                converted as ``pivotseg predict`` reads files) or a ``uint8 (H, W, 3)`` RGB
                array.
            probabilities: also return the class probabilities (``False`` skips the
                full-size ``(K, H, W)`` map and its memory).
            mode, crop, stride: inference (default: the run's ``eval`` section, see
                :attr:`run_config`, else whole-image).
            resize_short, max_long: the size the image is segmented at (default: the run's
                ``data.eval_resize_short``, else its ``data.max_size`` cap on the long side;
                0 switches either off); images below the model's minimum side are enlarged.
            tta_scales, tta_flip: test-time augmentation (default: the run's ``eval`` section,
                else one view; docs/evaluation.md).

        Returns:
            :class:`~pivotseg.tasks.dgss.predict.Prediction`: ``labels`` int64 ``(H, W)`` and
            ``probabilities`` float32 ``(K, H, W)`` (or ``None``), at the image's size.

        Raises:
            DataError: a missing or unreadable file, an array that is not uint8 ``(H, W, 3)``.
        """
        from pivotseg.tasks.dgss.predict import predict_image

        return predict_image(
            self,
            image,
            probabilities=probabilities,
            mode=mode,
            crop=crop,
            stride=stride,
            resize_short=resize_short,
            max_long=max_long,
            tta_scales=tta_scales,
            tta_flip=tta_flip,
        )

    # ----- training -------------------------------------------------------------------------
    def compute_loss(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Head loss (+ the tuning method's extra losses in training mode).

        ``labels (B, H, W)`` int64 with 255 = ignore; they are padded with 255 like the images,
        so head and tuning method see labels aligned with the padded input.
        """
        if labels.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"segmenter: labels {tuple(labels.shape)} do not match images {tuple(images.shape)}"
            )
        if self.training:
            self.tuning.prepare_batch(labels)
        outputs, (pad_h, pad_w) = self._run(images)
        labels = F.pad(labels.long(), (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        parts = dict(self.head.loss(outputs, labels))
        if self.training:
            for name, value in self.tuning.extra_loss(labels).items():
                if name in parts:
                    raise ValueError(f"segmenter: loss term {name!r} comes from head and method")
                parts[name] = value
        loss = sum(parts.values())
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    @property
    def warmup_images(self) -> int:
        """Source images the tuning method wants seen before training (see :meth:`warm_up`)."""
        return int(self.tuning.warmup_images)

    @torch.no_grad()
    def warm_up(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One warm-up batch: a no-grad, eval-mode backbone pass, then the method's warm-up
        step with the labels padded like the images (DPFT: pivot and presence statistics)."""
        mode = self.training
        self.eval()
        try:
            _, (pad_h, pad_w) = self._features(images)
            labels = F.pad(labels.long(), (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
            self.tuning.warm_up(labels)
        finally:
            self.train(mode)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimiser groups over the trainable parameters, one per (lr_mult, decay_mult).

        The tuning method's rules (substring of the full name, first match wins) come first;
        head parameters it does not match go without decay for norms, biases and embedding
        tables; everything else gets multipliers 1. Frozen parameters are left out. Each group
        carries ``lr``, ``weight_decay``, ``lr_mult``, ``decay_mult`` and ``param_names``.
        """
        rules = list(self.tuning.param_group_rules())
        head_no_decay = {f"head.{n}" for n in self.head.no_decay_parameter_names()}
        groups: dict[tuple[float, float], dict] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            options = next((opts for key, opts in rules if key in name), None)
            if options is None:
                options = {"decay_mult": 0.0 if name in head_no_decay else 1.0}
            key = (float(options.get("lr_mult", 1.0)), float(options.get("decay_mult", 1.0)))
            group = groups.setdefault(
                key,
                {
                    "params": [],
                    "param_names": [],
                    "lr": lr * key[0],
                    "weight_decay": weight_decay * key[1],
                    "lr_mult": key[0],
                    "decay_mult": key[1],
                },
            )
            group["params"].append(param)
            group["param_names"].append(name)
        return list(groups.values())

    # ----- checkpoints ----------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters plus the tuning method's and head's persistent buffers."""
        state = {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
        persistent = self.state_dict(keep_vars=True).keys()
        for name, buffer in self.named_buffers():
            if name.startswith(("tuning.", "head.")) and name in persistent:
                state[name] = buffer.detach()
        return state

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = self.trainable_state_dict()
        if self.config.backbone_source is None:
            # A random backbone cannot be rebuilt from a source: keep all of it.
            for name, tensor in self.backbone.state_dict().items():
                state.setdefault(f"backbone.{name}", tensor.detach())
        return state

    def save(self, folder: str | Path) -> Path:
        """Write ``segmenter.json`` and ``model.safetensors`` (trained tensors only)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = self.config.to_dict()
        # Every method argument, defaults included: a later change of a default must not
        # change what this checkpoint rebuilds.
        data["method_args"] = {**self.tuning.config(), **data["method_args"]}
        (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2))
        save_file(_unshared(self._checkpoint_state()), str(folder / WEIGHTS_FILE))
        return folder

    def load_trained(self, source: str | Path | dict[str, torch.Tensor]) -> None:
        """Load a ``model.safetensors`` (or a tensor dict) written by :meth:`save`, strictly.

        Raises:
            CheckpointError: keys missing, unexpected or of another shape (the first few named);
                a file that is missing, truncated or holds NaN/infinite values.
        """
        from pivotseg.engine.checkpoint import check_finite, read_tensors

        if isinstance(source, dict):
            state, where = source, "checkpoint"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / WEIGHTS_FILE
            state, where = read_tensors(path), str(path)
            check_finite(state, path)
        own = self._checkpoint_state()
        optional = set() if self.config.backbone_source is None else _backbone_keys(self)
        mismatch = state_mismatch(own, state, optional)
        if mismatch:
            c = self.config
            raise CheckpointError(
                f"{where}: does not fit this {c.backbone}/{c.method}/{c.head} segmenter: "
                f"{mismatch}; load it with the segmenter.json it was saved with"
            )
        self.load_state_dict(state, strict=False)


def _backbone_keys(model: Segmenter) -> set[str]:
    return {f"backbone.{k}" for k in model.backbone.state_dict()}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared memory (safetensors refuses shared storage).

    ``named_parameters`` already lists a tied parameter once; this only copies the rare
    distinct tensors that view one storage.
    """
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def component_seed(seed: int, component: str) -> int:
    """The seed of one part's random stream (``"backbone"``, ``"method"``, ``"head"``)."""
    # crc32, not hash(): Python salts str hashes per process.
    entropy = [seed % 2**64, zlib.crc32(component.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


@contextmanager
def _stream(seed: int, component: str):
    """Run a part's construction on its own stream; the global CPU generator is left as it was.

    Only the CPU generator, which initialises modules built on the CPU: ``torch.manual_seed``
    would also (lazily) reseed CUDA, beyond what ``fork_rng(devices=[])`` restores.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(component_seed(seed, component))
        yield


def build_segmenter(
    cfg: SegmenterConfig | dict,
    backbone: Backbone | None = None,
    *,
    seed: int | None = None,
    strict: bool = True,
) -> Segmenter:
    """Backbone (from ``cfg.backbone_source`` or random) + tuning method + head.

    Each of the three is initialised from its own random stream derived from ``seed``
    (:func:`component_seed`), so for one seed the head starts from the same weights whatever
    the tuning method and its arguments, and a random backbone is the same too: rows of a
    benchmark that differ only in the method are paired comparisons.

    Query linkage is wired here (:func:`_query_settings`): a method that provides queries
    (``provides_queries``) gets ``query_dim`` = the head's query width when the head accepts
    queries, else ``link_queries=False``; a method with queries (``num_queries > 0``) and such
    a head give ``external_queries=True`` to the head. Explicit settings in ``cfg`` win, and
    these derived ones are not written back into ``cfg``.

    Args:
        cfg: the config (or its dict form).
        backbone: an already built backbone to use instead of building one from ``cfg``.
        seed: the seed of the three streams (training passes the run's seed); ``None`` draws
            it from the global torch generator, so ``torch.manual_seed`` still reproduces a
            build. An explicit seed leaves the global generator untouched.
        strict: refuse a ``head_args.num_queries`` that the method's queries override;
            :func:`load_segmenter` turns it off so that checkpoints saved before this check
            still load (the setting never changed what they hold).

    Raises:
        ConfigError: unknown names or settings, or ``head_args.num_queries`` other than the
            method's query count.
    """
    from pivotseg.tuning import build_method

    if isinstance(cfg, dict):
        cfg = SegmenterConfig.from_dict(cfg)
    if seed is None:
        # On the CPU generator even under a meta/cuda default device (torch.device(...) blocks).
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
    if backbone is None:
        with _stream(seed, "backbone"):
            backbone = build_backbone(
                cfg.backbone,
                cfg.backbone_source,
                config=dict(cfg.backbone_config),
                out_indices=cfg.out_indices,
                **cfg.backbone_kwargs,
            )
    method_args = dict(cfg.method_args)
    for key, value in _query_settings(cfg).items():
        method_args.setdefault(key, value)
    with _stream(seed, "method"):
        tuning = build_method(cfg.method, backbone, cfg.num_classes, **method_args)
    head_args = dict(cfg.head_args)
    if tuning.num_queries and HEADS[cfg.head].accepts_queries:
        # Rein's query linkage: the method's queries replace the head's learnt ones.
        head_args.setdefault("external_queries", True)
        if head_args["external_queries"] and strict:
            _refuse_unused_query_count(cfg, tuning.num_queries)
    with _stream(seed, "head"):
        head = build_head(
            cfg.head, backbone.out_dims, backbone.out_strides, cfg.num_classes, **head_args
        )
    return Segmenter(cfg, backbone, tuning, head)


def _query_settings(cfg: SegmenterConfig) -> dict[str, Any]:
    """The query-link arguments ``cfg.method`` gets from ``cfg.head`` (none for a method
    without queries or an unknown one, which :func:`build_method` refuses)."""
    from pivotseg.tuning import METHODS

    method_cls = METHODS.get(cfg.method)
    if method_cls is None or not method_cls.provides_queries:
        return {}
    head_cls = HEADS[cfg.head]
    if head_cls.accepts_queries:
        return {"query_dim": head_cls.query_dim(cfg.head_args)}
    # Query-link layers would never receive gradients with a head that takes no queries.
    return {"link_queries": False}


def _refuse_unused_query_count(cfg: SegmenterConfig, method_queries: int) -> None:
    given = cfg.head_args.get("num_queries")
    if given is not None and given != method_queries:
        raise ConfigError(
            f"model.head_args.num_queries={given} is unused: the {cfg.method} method gives the "
            f"head its own {method_queries} queries; remove num_queries from model.head_args "
            f"(or set it to {method_queries})"
        )


def load_segmenter(folder: str | Path, backbone_source: str | Path | None = None) -> Segmenter:
    """Rebuild a segmenter saved by :meth:`Segmenter.save` and load its trained tensors.

    The training run's ``config.yaml`` (in the folder or up to two folders above), when there
    is one, becomes :attr:`Segmenter.run_config`, so that :meth:`Segmenter.predict` segments
    as ``pivotseg predict`` does.

    Args:
        folder: the checkpoint folder (``segmenter.json`` + ``model.safetensors``), or a run
            folder (its ``checkpoints/last``).
        backbone_source: where the pretrained backbone is now, if not where the config says
            (e.g. a local copy of a hub model).

    Raises:
        CheckpointError: the folder is incomplete or its tensors do not fit the config.
    """
    from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.exists() and (folder / "checkpoints").is_dir():
        folder = resolve_model_folder(folder)  # a run folder
        config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(
            f"{folder}: no {CONFIG_FILE}; pass a folder written by Segmenter.save"
        )
    from pivotseg.backbones.hub import refuse_unsafe_options
    from pivotseg.engine.checkpoint import read_json

    data = read_json(config_path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: not a segmenter config (a JSON object)")
    # A shared run folder is untrusted input: refuse loader options before building anything.
    refuse_unsafe_options(data.get("backbone_config") or {}, f"{config_path}: backbone_config")
    if backbone_source is not None:
        data["backbone_source"] = str(backbone_source)
    cfg = SegmenterConfig.from_dict(data, where=str(config_path))
    model = build_segmenter(cfg, strict=False)
    model.load_trained(folder / WEIGHTS_FILE)
    model.run_config = find_run_config(folder)
    return model.eval()
