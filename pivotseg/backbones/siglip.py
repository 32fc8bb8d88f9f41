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
from typing import Any

import torch
import torch.nn.functional as F

from pivotseg.backbones.base import choose_preset
from pivotseg.backbones.hf import VisionTowerBackbone, build_vision_tower, load_tokenizer
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

NON_VISION_KEYS = ("text_model.", "logit_scale", "logit_bias")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


class SiglipBackbone(VisionTowerBackbone):
    name = "siglip"
    pixel_mean = (127.5, 127.5, 127.5)  # SigLIP maps pixels to [-1, 1]
    pixel_std = (127.5, 127.5, 127.5)

    non_vision_keys = NON_VISION_KEYS
    vision_only_hint = "holds only a SigLIP vision tower; with_text=True needs a full SiglipModel"
    num_prefix_tokens = 0  # no class token: every token is a patch token

    @staticmethod
    def model_classes():
        from transformers import SiglipModel, SiglipVisionModel

        return SiglipModel, SiglipVisionModel

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


def load_siglip_tokenizer(source):
    """SigLIP's tokenizer from ``source``, or ``None`` (no files, or no sentencepiece)."""
    from transformers import AutoTokenizer

    return load_tokenizer(source, AutoTokenizer, TOKENIZER_FILES)


def random_siglip_model(config: dict[str, Any], with_text: bool):
    """Random weights from ``{"variant": ..., **vision overrides, "text_config": {...}}``."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    variant, config = choose_preset("siglip", PRESETS, config, "base_p16_224")
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
    return build_vision_tower(
        SiglipBackbone,
        source,
        config,
        out_indices,
        with_text,
        random_siglip_model,
        load_siglip_tokenizer,
    )
