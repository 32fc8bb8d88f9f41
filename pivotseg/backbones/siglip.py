"""SigLIP ViT through transformers' ``SiglipModel`` / ``SiglipVisionModel`` (wrapped, not forked).

SigLIP has no class token: every token of an encoder layer is a patch token, and the feature maps
are those tokens before the final ``post_layernorm``. Position embeddings are resized bicubically
to the input grid by transformers' ``interpolate_pos_encoding``. The attention-pooling head is
kept with the weights but not used by :meth:`forward`.

Text side: a backbone built from a full ``SiglipModel`` keeps the text tower;
:meth:`SiglipBackbone.encode_text` gives L2-normalised text embeddings. SigLIP's tokenizer is a
SentencePiece model (the ``sentencepiece`` package, not a pivotseg dependency); without it, pass
token ids padded to the text length (64), as SigLIP was trained. Unlike CLIP, SigLIP pools its
image embedding by attention, so there is no per-patch projection into the text space here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from pivotseg.backbones.base import (
    Backbone,
    is_saved_folder,
    load_state_strict,
    read_saved_folder,
    tokens_to_map,
)
from pivotseg.backbones.dinov2 import from_pretrained_checked, pick_model_class
from pivotseg.errors import ConfigError


def _tower(hidden: int, layers: int, heads: int, mlp: int) -> dict[str, int]:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
    )


# Published SigLIP sizes (google/siglip-*): vision tower and text tower (vocabulary 32000).
PRESETS: dict[str, dict[str, Any]] = {
    "base_p16_224": dict(
        vision={**_tower(768, 12, 12, 3072), "patch_size": 16, "image_size": 224},
        text=_tower(768, 12, 12, 3072),
    ),
    "large_p16_256": dict(
        vision={**_tower(1024, 24, 16, 4096), "patch_size": 16, "image_size": 256},
        text=_tower(1024, 24, 16, 4096),
    ),
    "so400m_p14_384": dict(
        vision={**_tower(1152, 27, 16, 4304), "patch_size": 14, "image_size": 384},
        text=_tower(1152, 27, 16, 4304),
    ),
}
HUB_IDS = {
    "base_p16_224": "google/siglip-base-patch16-224",
    "large_p16_256": "google/siglip-large-patch16-256",
    "so400m_p14_384": "google/siglip-so400m-patch14-384",
}
# SigLIP's tokenizer pads with id 1 (</s>), which also ends each text.
_TEXT_IDS = dict(pad_token_id=1, eos_token_id=1, bos_token_id=None)

MODEL_TYPES = {"siglip": SiglipModel, "siglip_vision_model": SiglipVisionModel}
SAVED_CLASSES = {
    "SiglipModel": (SiglipModel, SiglipConfig),
    "SiglipVisionModel": (SiglipVisionModel, SiglipVisionConfig),
}
NON_VISION_KEYS = ("text_model.", "logit_scale", "logit_bias")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


class SiglipBackbone(Backbone):
    name = "siglip"
    pixel_mean = (127.5, 127.5, 127.5)  # SigLIP maps pixels to [-1, 1]
    pixel_std = (127.5, 127.5, 127.5)

    def __init__(self, model: SiglipModel | SiglipVisionModel, out_indices=None, tokenizer=None):
        super().__init__(out_indices)
        self.model = model
        self.tokenizer = tokenizer
        self.patch_size = self.size_divisor = self.vision.config.patch_size

    @property
    def vision(self) -> SiglipVisionModel:
        return self.model.vision_model if isinstance(self.model, SiglipModel) else self.model

    @property
    def has_text(self) -> bool:
        return isinstance(self.model, SiglipModel)

    @property
    def blocks(self):
        return list(self.vision.encoder.layers)

    @property
    def block_dims(self):
        return [self.vision.config.hidden_size] * self.vision.config.num_hidden_layers

    def block_strides(self):
        return [self.patch_size] * self.vision.config.num_hidden_layers

    def _split_block_output(self, index, output):
        # No class token: the whole block output is patch tokens.
        tensor = output[0] if isinstance(output, tuple) else output

        def rebuild(new_tokens):
            return (new_tokens, *output[1:]) if isinstance(output, tuple) else new_tokens

        return tensor, self._current_hw, rebuild

    def forward_blocks(self, pixel_values, indices):
        h, w = pixel_values.shape[-2:]
        self._current_hw = (h // self.patch_size, w // self.patch_size)
        wanted = set(indices)
        x = self.vision.embeddings(pixel_values, interpolate_pos_encoding=True)
        maps = {}
        for i, layer in enumerate(self.vision.encoder.layers):
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
            if i in wanted:
                maps[i] = tokens_to_map(x, self._current_hw)
            if i >= max(wanted):
                break
        return [maps[i] for i in indices]

    def encode_text(
        self, texts: Sequence[str] | torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, hidden)``.

        Args:
            texts: strings (needs the source's tokenizer) or token ids ``(N, L)`` padded to the
                text length with the pad id, as SigLIP's tokenizer does (it pools the last token).
            attention_mask: optional ``(N, L)`` mask for ids.
        """
        if not self.has_text:
            raise ConfigError(
                "siglip: encode_text needs the text tower, but this backbone holds the vision "
                "tower only; build it from a full SiglipModel source or with with_text=True"
            )
        if isinstance(texts, torch.Tensor):
            inputs = {"input_ids": texts, "attention_mask": attention_mask}
        elif self.tokenizer is None:
            raise ConfigError(
                "siglip: no tokenizer could be loaded with these weights (it needs the "
                "sentencepiece package and spiece.model/tokenizer.json); pass token ids instead"
            )
        else:
            max_len = self.model.config.text_config.max_position_embeddings
            tokens = self.tokenizer(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            inputs = {"input_ids": tokens["input_ids"], "attention_mask": None}
        device = self.model.logit_scale.device
        inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
        out = self.model.get_text_features(**inputs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return F.normalize(feats, dim=-1)

    def config_dict(self):
        return {
            "name": self.name,
            "model_class": type(self.model).__name__,
            "config": self.model.config.to_dict(),
            "out_indices": self._out_indices,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = super().save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))
        return folder


def load_siglip_tokenizer(source):
    """SigLIP's tokenizer from ``source``, or ``None`` (no files, or no sentencepiece)."""
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, ImportError):
        return None


def random_siglip_model(config: dict[str, Any], with_text: bool):
    """Random weights from ``{"variant": ..., **vision overrides, "text_config": {...}}``."""
    config = dict(config)
    variant = config.pop("variant", "base_p16_224")
    if variant not in PRESETS:
        raise ConfigError(f"siglip: unknown variant {variant!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[variant]
    text = {**preset["text"], **_TEXT_IDS, **config.pop("text_config", {})}
    vision = {**preset["vision"], **config}
    if not with_text:
        return SiglipVisionModel(SiglipVisionConfig(**vision))
    return SiglipModel(SiglipConfig(vision_config=vision, text_config=text))


def build_siglip(
    source=None, config=None, out_indices=None, with_text: bool | None = None
) -> SiglipBackbone:
    """SigLIP from a hub id / transformers folder / saved folder, or random from a preset.

    Args:
        source: ``google/siglip-base-patch16-224``, a transformers folder of a ``SiglipModel`` or
            ``SiglipVisionModel``, a pivotseg backbone folder, or ``None`` for random weights.
        config: random weights: ``{"variant": "base_p16_224", ...}`` plus ``SiglipVisionConfig``
            fields and ``text_config``; with a source: ``from_pretrained`` keyword arguments.
        with_text: keep the text tower; ``None`` keeps what the source holds (none if random).

    Raises:
        CheckpointError: the source is not a SigLIP checkpoint or its keys do not fit.
    """
    config = dict(config or {})
    if is_saved_folder(source):
        saved, state = read_saved_folder(source)
        model_class, config_class = SAVED_CLASSES[saved["model_class"]]
        model = model_class(config_class(**saved["config"]))
        tokenizer = load_siglip_tokenizer(source) if model_class is SiglipModel else None
        wrapper = SiglipBackbone(model, out_indices or saved.get("out_indices"), tokenizer)
        load_state_strict(wrapper, state, source, f"pivotseg siglip ({saved['model_class']})")
        return wrapper
    if source is None:
        return SiglipBackbone(random_siglip_model(config, bool(with_text)), out_indices)
    model_class = pick_model_class(source, "siglip", MODEL_TYPES)
    allow_unexpected: tuple[str, ...] = ()
    if with_text and model_class is SiglipVisionModel:
        raise ConfigError(
            f"{source}: holds only a SigLIP vision tower; with_text=True needs a full SiglipModel"
        )
    if with_text is False and model_class is SiglipModel:
        model_class, allow_unexpected = SiglipVisionModel, NON_VISION_KEYS
    model = from_pretrained_checked(
        model_class,
        source,
        f"transformers {model_class.__name__}",
        allow_unexpected=allow_unexpected,
        **config,
    )
    tokenizer = load_siglip_tokenizer(source) if model_class is SiglipModel else None
    return SiglipBackbone(model, out_indices, tokenizer)
