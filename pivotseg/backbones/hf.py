"""Loading transformers models: the path every transformers-backed backbone shares.

transformers only *warns* about checkpoint keys that do not fit (and initialises the missing ones
at random), so :func:`from_pretrained_checked` turns that report into a
:class:`~pivotseg.errors.CheckpointError`. :func:`pick_model_class` reads a source's
``config.json`` to choose among the model classes a backbone accepts.

:func:`load_transformers` is both in one call.

:class:`VisionTowerBackbone` and :func:`build_vision_tower` are the parts CLIP and SigLIP share:
a ViT vision tower, alone or inside a full image-text model whose text tower is kept.

transformers is imported inside functions only, so that importing a backbone module (and the
registry in :mod:`pivotseg.backbones`) does not import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from pivotseg.backbones.base import (
    Backbone,
    describe_key_mismatch,
    is_saved_folder,
    load_saved_folder,
    tokens_to_map,
)
from pivotseg.backbones.hub import safe_from_pretrained, source_error
from pivotseg.errors import CheckpointError, ConfigError


def source_model_type(source) -> str | None:
    """The ``model_type`` of a hub id's or transformers folder's ``config.json``."""
    from transformers import PreTrainedConfig

    try:
        raw, _ = PreTrainedConfig.get_config_dict(str(source))
    except (OSError, ValueError) as err:
        raise source_error(source, err, "transformers config.json") from None
    return raw.get("model_type")


def pick_model_class(source, name: str, classes: dict[str, type]) -> type:
    """The class for ``source``'s ``model_type`` among ``classes``, or a CheckpointError."""
    model_type = source_model_type(source)
    if model_type not in classes:
        raise CheckpointError(
            f"{source}: holds a {model_type!r} model (config.json model_type), which backbone "
            f"{name!r} does not read; it reads {', '.join(classes)}"
        )
    return classes[model_type]


def from_pretrained_checked(
    model_class, source, layout: str, allow_unexpected: tuple[str, ...] = (), **kwargs
):
    """``model_class.from_pretrained(source)`` that fails on keys that do not fit.

    Args:
        model_class: a transformers ``PreTrainedModel`` class.
        source: hub id or local folder.
        layout: what was expected, for the message (e.g. ``"transformers CLIPModel"``).
        allow_unexpected: prefixes of checkpoint keys that may be left unused on purpose (e.g. the
            text tower when only the vision tower is loaded).
        **kwargs: a config's ``backbone_config``: only what
            :func:`pivotseg.backbones.hub.check_options` allows reaches ``from_pretrained``.

    Raises:
        ConfigError: a refused or unknown option.
        CheckpointError: naming the first few missing, unexpected or reshaped keys; or the
            source holds pickled weights only.
    """
    # The source fixes the architecture; a preset name kept next to it in a config is redundant
    # (transformers would store it as a stray config attribute).
    kwargs.pop("variant", None)
    model, info = safe_from_pretrained(
        model_class, source, kwargs, output_loading_info=True, ignore_mismatched_sizes=True
    )
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(
        k for k in info.get("unexpected_keys") or [] if not k.startswith(allow_unexpected)
    )
    reshaped = sorted(info.get("mismatched_keys") or [])
    mismatch = describe_key_mismatch(missing, unexpected, reshaped)
    if mismatch:
        raise CheckpointError(
            f"{source}: does not fit the {layout} layout: {mismatch}; check the "
            "backbone name and config"
        )
    return model


def load_transformers(source, name: str, classes: dict[str, type], **options):
    """The model in hub id / folder ``source``, of the class its ``model_type`` picks in
    ``classes`` (see :func:`pick_model_class`), loaded by :func:`from_pretrained_checked`."""
    model_class = pick_model_class(source, name, classes)
    return from_pretrained_checked(
        model_class, source, f"transformers {model_class.__name__}", **options
    )


def load_tokenizer(source, tokenizer_class, files: tuple[str, ...]):
    """``tokenizer_class.from_pretrained(source)``, or ``None`` when it cannot be loaded.

    Args:
        source: hub id or folder.
        tokenizer_class: e.g. ``CLIPTokenizer`` or ``AutoTokenizer``.
        files: tokenizer files, one of which a local folder must hold.
    """
    # Without files, from_pretrained may build a 2-token tokenizer instead of failing: check first.
    if Path(source).is_dir() and not any((Path(source) / f).exists() for f in files):
        return None
    try:
        return tokenizer_class.from_pretrained(str(source))
    except (OSError, ValueError, ImportError):
        return None


class VisionTowerBackbone(Backbone):
    """A transformers ViT vision tower, alone or inside a full image-text model.

    Subclasses set the class attributes below and :meth:`model_classes`. Feature maps are the
    patch tokens (the first ``num_prefix_tokens`` dropped) after chosen encoder layers, before
    the final ``post_layernorm``; position embeddings follow the input grid through
    transformers' ``interpolate_pos_encoding``.

    Attributes:
        non_vision_keys: keys of a full checkpoint that a vision-only load leaves unused.
        vision_only_hint: end of the message when text is asked of a vision-only source.
        num_prefix_tokens: class tokens in front of the patch tokens.
    """

    non_vision_keys: ClassVar[tuple[str, ...]]
    vision_only_hint: ClassVar[str]
    num_prefix_tokens: ClassVar[int] = 1

    def __init__(self, model, out_indices=None, tokenizer=None):
        super().__init__(out_indices)
        self.model = model
        self.tokenizer = tokenizer
        self.patch_size = self.size_divisor = self.vision.config.patch_size

    @staticmethod
    def model_classes() -> tuple[type, type]:
        """The transformers image-text model (``CLIPModel``) and vision-only model
        (``CLIPVisionModel``) classes; anything but the first is a vision tower."""
        raise NotImplementedError

    @classmethod
    def model_types(cls) -> dict[str, type]:
        """``config.json`` model_type -> class, for :func:`pick_model_class`."""
        return {c.config_class.model_type: c for c in cls.model_classes()}

    @property
    def vision(self):
        """The vision tower (the whole model when it was loaded without text)."""
        return self.model.vision_model if self.has_text else self.model

    @property
    def has_text(self) -> bool:
        return isinstance(self.model, self.model_classes()[0])

    @property
    def blocks(self):
        return list(self.vision.encoder.layers)

    @property
    def block_dims(self):
        return [self.vision.config.hidden_size] * self.vision.config.num_hidden_layers

    def block_strides(self):
        return [self.patch_size] * self.vision.config.num_hidden_layers

    def _split_block_output(self, index, output):
        tensor = output[0] if isinstance(output, tuple) else output
        n = self.num_prefix_tokens
        if not n:
            # No class token: the whole block output is patch tokens.
            def rebuild(new_tokens):
                return (new_tokens, *output[1:]) if isinstance(output, tuple) else new_tokens

            return tensor, self._current_hw, rebuild
        prefix, tokens = tensor[:, :n], tensor[:, n:]

        def rebuild(new_tokens):
            out = torch.cat([prefix, new_tokens], dim=1)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return tokens, self._current_hw, rebuild

    def block_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        self._current_hw = (h // self.patch_size, w // self.patch_size)
        return self.vision.embeddings(pixel_values, interpolate_pos_encoding=True)

    def run_block(self, index, x):
        out = self.blocks[index](x, None)  # no attention mask
        return out[0] if isinstance(out, tuple) else out

    def block_map(self, index, x):
        return tokens_to_map(x[:, self.num_prefix_tokens :], self._current_hw)

    def config_dict(self):
        return {
            "name": self.name,
            "model_class": type(self.model).__name__,
            "config": self.model.config.to_dict(),
            "out_indices": self._out_indices,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Weights and config as :class:`Backbone` writes them, plus the tokenizer if any."""
        folder = super().save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        return folder


def build_vision_tower(
    wrapper_class: type[VisionTowerBackbone],
    source,
    config: dict[str, Any] | None,
    out_indices,
    with_text: bool | None,
    random_model,
    load_tokenizer_fn,
) -> VisionTowerBackbone:
    """The build path CLIP and SigLIP share (see ``build_clip`` for the arguments).

    Args:
        wrapper_class: the :class:`VisionTowerBackbone` subclass to build.
        random_model: ``(config, with_text) -> model`` with random weights.
        load_tokenizer_fn: ``source -> tokenizer or None``.
    """
    cls, name = wrapper_class, wrapper_class.name
    full, vision_only = cls.model_classes()
    config = dict(config or {})
    if is_saved_folder(source):

        def make(saved, levels):
            model_class = {c.__name__: c for c in (full, vision_only)}[saved["model_class"]]
            model = model_class(model_class.config_class(**saved["config"]))
            return cls(model, levels, load_tokenizer_fn(source) if model_class is full else None)

        return load_saved_folder(source, out_indices, make)
    if source is None:
        return cls(random_model(config, bool(with_text)), out_indices)
    model_class = pick_model_class(source, name, cls.model_types())
    allow_unexpected: tuple[str, ...] = ()
    if with_text and model_class is vision_only:
        raise ConfigError(f"{source}: {cls.vision_only_hint}")
    if with_text is False and model_class is full:
        model_class, allow_unexpected = vision_only, cls.non_vision_keys
    model = from_pretrained_checked(
        model_class,
        source,
        f"transformers {model_class.__name__}",
        allow_unexpected=allow_unexpected,
        **config,
    )
    tokenizer = load_tokenizer_fn(source) if model_class is full else None
    return cls(model, out_indices, tokenizer)
