"""CLIP ViT through transformers' ``CLIPModel`` / ``CLIPVisionModel`` (wrapped, not forked).

Feature maps are the patch tokens (class token dropped) after chosen encoder layers, before the
final ``post_layernorm``, as for DINOv2. Position embeddings are resized bicubically to the input
grid by transformers' own ``interpolate_pos_encoding`` (unchanged at the pretraining size), so any
multiple of the patch size works.

Text side, for open-vocabulary and vision-language methods: a backbone built from a full
``CLIPModel`` (hub ids such as ``openai/clip-vit-base-patch16``, or ``with_text=True`` for random
weights) also keeps the text tower and both projections:

- :meth:`ClipBackbone.encode_text` gives L2-normalised text embeddings ``(N, D)``;
- :meth:`ClipBackbone.project_patch_tokens` maps patch tokens into the same space
  (``post_layernorm`` then ``visual_projection``, what CLIP applies to its class token).

Strings need a tokenizer: ``CLIPTokenizer`` is loaded from the same source when it holds tokenizer
files and :meth:`ClipBackbone.save_pretrained` writes it next to the weights; otherwise pass token
ids. :meth:`forward` does not use the text tower or ``post_layernorm``: when those parameters are
trained under DDP, enable ``find_unused_parameters`` (or build with ``with_text=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pivotseg.backbones.base import CLIP_MEAN, CLIP_STD, choose_preset, tokens_to_map
from pivotseg.backbones.hf import VisionTowerBackbone, build_vision_tower, load_tokenizer
from pivotseg.errors import ConfigError

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPVisionModel

_VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_VIT_L = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)
_TEXT_B = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048)
_TEXT_L = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)

# The published OpenAI CLIP ViT sizes: vision tower, text tower, joint embedding width.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_b32": dict(vision={**_VIT_B, "patch_size": 32, "image_size": 224}, text=_TEXT_B, dim=512),
    "vit_b16": dict(vision={**_VIT_B, "patch_size": 16, "image_size": 224}, text=_TEXT_B, dim=512),
    "vit_l14": dict(vision={**_VIT_L, "patch_size": 14, "image_size": 224}, text=_TEXT_L, dim=768),
    "vit_l14_336": dict(
        vision={**_VIT_L, "patch_size": 14, "image_size": 336}, text=_TEXT_L, dim=768
    ),
}
HUB_IDS = {
    "vit_b32": "openai/clip-vit-base-patch32",
    "vit_b16": "openai/clip-vit-base-patch16",
    "vit_l14": "openai/clip-vit-large-patch14",
    "vit_l14_336": "openai/clip-vit-large-patch14-336",
}

# Keys of a full CLIPModel checkpoint that a vision-only load leaves unused on purpose.
NON_VISION_KEYS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class ClipBackbone(VisionTowerBackbone):
    name = "clip"
    pixel_mean = CLIP_MEAN
    pixel_std = CLIP_STD

    non_vision_keys = NON_VISION_KEYS
    vision_only_hint = (
        "holds only a CLIP vision tower; with_text=True needs a full CLIPModel "
        "checkpoint (e.g. openai/clip-vit-base-patch16)"
    )

    @staticmethod
    def model_classes():
        from transformers import CLIPModel, CLIPVisionModel

        return CLIPModel, CLIPVisionModel

    def block_input(self, pixel_values):
        return self.vision.pre_layrnorm(super().block_input(pixel_values))

    # ----- running in two parts (FAMix mines styles in between) ---------------------------------
    def run_to_block(self, pixel_values, index):
        index %= self.num_blocks
        x = self.block_input(pixel_values)
        for i in range(index + 1):
            x = self.run_block(i, x)
        return self.block_map(index, x), x[:, : self.num_prefix_tokens]

    def continue_from_block(self, index, features, prefix=None):
        """CLIP's image embedding: the class token ``prefix`` runs with the patch tokens of
        ``features`` through the later blocks, then ``post_layernorm`` and
        ``visual_projection``."""
        model = self._text_model("the image embedding (continue_from_block)")
        if prefix is None:
            raise ValueError("clip: continue_from_block needs the class token run_to_block gave")
        x = torch.cat([prefix, features.flatten(2).transpose(1, 2)], dim=1)
        for i in range(index % self.num_blocks + 1, self.num_blocks):
            x = self.run_block(i, x)
        return model.visual_projection(self.vision.post_layernorm(x[:, 0]))

    # ----- text side ------------------------------------------------------------------------------
    def _text_model(self, what: str) -> CLIPModel:
        if not self.has_text:
            raise ConfigError(
                f"clip: {what} needs the text tower, but this backbone holds the vision tower "
                "only; build it from a full CLIPModel source or with with_text=True"
            )
        return self.model

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` for ``texts`` (needs a tokenizer)."""
        if self.tokenizer is None:
            raise ConfigError(
                "clip: no tokenizer came with these weights (no tokenizer.json/vocab.json in the "
                "source); pass token ids to encode_text or use a source that has them"
            )
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def encode_text(
        self, texts: Sequence[str] | torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, projection_dim)``.

        Args:
            texts: strings (tokenised with the source's tokenizer) or token ids ``(N, L)``
                (each row holding CLIP's end-of-text token, as the tokenizer writes it).
            attention_mask: ``(N, L)`` when ``texts`` are ids with padding.
        """
        model = self._text_model("encode_text")
        if isinstance(texts, torch.Tensor):
            inputs = {"input_ids": texts, "attention_mask": attention_mask}
        else:
            inputs = self.tokenize(texts)
        device = model.text_projection.weight.device
        inputs = {k: v.to(device) if v is not None else None for k, v in inputs.items()}
        out = model.get_text_features(**inputs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return F.normalize(feats, dim=-1)

    def project_patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features in the joint image-text space (not normalised).

        Args:
            features: a feature map ``(B, C, h, w)`` as :meth:`forward` returns (normally of the
                last block) or tokens ``(B, N, C)``.

        Returns:
            The same layout with ``projection_dim`` channels.
        """
        model = self._text_model("project_patch_tokens")
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        out = model.visual_projection(self.vision.post_layernorm(tokens))
        return tokens_to_map(out, tuple(features.shape[-2:])) if features.ndim == 4 else out


def load_clip_tokenizer(source):
    """``CLIPTokenizer`` from ``source``, or ``None`` when it holds no tokenizer files."""
    from transformers import CLIPTokenizer

    return load_tokenizer(source, CLIPTokenizer, TOKENIZER_FILES)


def random_clip_model(config: dict[str, Any], with_text: bool) -> CLIPModel | CLIPVisionModel:
    """A randomly initialised model from ``{"variant": ..., **vision overrides}``.

    ``text_config`` (overrides of the text tower) and ``projection_dim`` apply with text only.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    variant, config = choose_preset("clip", PRESETS, config, "vit_b16")
    preset = PRESETS[variant]
    text = {**preset["text"], **config.pop("text_config", {})}
    dim = config.pop("projection_dim", preset["dim"])
    vision = {**preset["vision"], **config}
    if not with_text:
        return CLIPVisionModel(CLIPVisionConfig(**vision))
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=dim))


def build_clip(
    source=None, config=None, out_indices=None, with_text: bool | None = None
) -> ClipBackbone:
    """CLIP ViT from a hub id / transformers folder / saved folder, or random from a preset.

    Args:
        source: ``openai/clip-vit-base-patch16``, a transformers ``save_pretrained`` folder of a
            ``CLIPModel`` or ``CLIPVisionModel``, a pivotseg backbone folder, or ``None``.
        config: random weights: ``{"variant": "vit_b16", ...}`` (see :data:`PRESETS`) plus any
            ``CLIPVisionConfig`` field, ``text_config`` and ``projection_dim``; with a source:
            keyword arguments for ``from_pretrained``.
        with_text: keep the text tower and projections. ``None``: what the source holds (no text
            for random weights); ``False`` loads only the vision tower of a full checkpoint.

    Raises:
        CheckpointError: the source is not a CLIP checkpoint or its keys do not fit.
        ConfigError: ``with_text=True`` with a vision-only source, or an unknown variant.
    """
    return build_vision_tower(
        ClipBackbone, source, config, out_indices, with_text, random_clip_model, load_clip_tokenizer
    )
