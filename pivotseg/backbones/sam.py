"""SAM's ViT image encoder through transformers' ``SamVisionEncoder`` (wrapped, not forked).

Blocks output ``(B, H, W, C)`` maps (window attention partitions and restores them inside each
block), so hooks see them flattened to ``(B, H*W, C)`` tokens and the result is folded back.

Other input sizes: SAM was trained at 1024 with a 64x64 absolute position embedding. The wrapper
runs the patch projection itself and resizes that embedding bicubically to the token grid
(unchanged at 1024, the same as transformers there); window attention pads to whole windows and
the relative position tables of the global-attention blocks are resized by transformers itself.
This interpolation is the usual one (as for ViT position embeddings), not something SAM was
trained with: features at sizes far from 1024 are less faithful.

Feature levels: block indices, plus the neck (two convolutions to 256 channels at stride 16,
the embedding SAM's mask decoder reads) chosen with ``"neck"`` (or ``num_blocks``) in
``out_indices``, e.g. ``[3, 5, 8, "neck"]``. The neck's parameters are always kept, used or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F

from pivotseg.backbones.base import (
    NECK,
    Backbone,
    choose_preset,
    default_out_indices,
    is_saved_folder,
    levels_with_neck,
    load_saved_folder,
    split_grid_output,
)
from pivotseg.backbones.hf import load_transformers

if TYPE_CHECKING:
    from transformers.models.sam.modeling_sam import SamVisionEncoder

# The published image encoders (facebook/sam-vit-{base,large,huge}).
PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072,
        global_attn_indexes=[2, 5, 8, 11],
    ),
    "vit_l": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_dim=4096,
        global_attn_indexes=[5, 11, 17, 23],
    ),
    "vit_h": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
        global_attn_indexes=[7, 15, 23, 31],
    ),
}  # fmt: skip
HUB_IDS = {
    k: f"facebook/sam-vit-{v}"
    for k, v in [("vit_b", "base"), ("vit_l", "large"), ("vit_h", "huge")]
}


def model_types() -> dict[str, type]:
    """``config.json`` model_type -> transformers class holding a ``vision_encoder``."""
    from transformers import SamModel, SamVisionModel

    return {"sam": SamModel, "sam_vision_model": SamVisionModel}


def vision_encoder(config: dict[str, Any]) -> SamVisionEncoder:
    """A randomly initialised transformers ``SamVisionEncoder`` of ``SamVisionConfig(**config)``."""
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    return SamVisionEncoder(SamVisionConfig(**config))


class SamBackbone(Backbone):
    name = "sam"

    def __init__(self, encoder: SamVisionEncoder, out_indices=None):
        super().__init__(None)
        self.encoder = encoder
        self.patch_size = self.size_divisor = encoder.config.patch_size
        self.out_indices = (
            out_indices
            if out_indices is not None
            else default_out_indices(encoder.config.num_hidden_layers)
        )

    # ----- levels: blocks plus the neck -------------------------------------------------------
    @property
    def out_indices(self) -> list[int]:
        return list(self._out_indices)

    @out_indices.setter
    def out_indices(self, value: Sequence[int | str]) -> None:
        self._out_indices = levels_with_neck("sam", value, self.num_blocks)

    @property
    def out_dims(self) -> list[int]:
        dims = [*self.block_dims, self.encoder.config.output_channels]
        return [dims[i] for i in self.out_indices]

    @property
    def out_strides(self) -> list[int]:
        strides = [*self.block_strides(), self.patch_size]
        return [strides[i] for i in self.out_indices]

    # ----- Backbone interface -----------------------------------------------------------------
    @property
    def blocks(self):
        return list(self.encoder.layers)

    @property
    def block_dims(self):
        return [self.encoder.config.hidden_size] * self.encoder.config.num_hidden_layers

    def block_strides(self):
        return [self.patch_size] * self.encoder.config.num_hidden_layers

    def _split_block_output(self, index, output):
        return split_grid_output(output)

    def position_embedding(self, hw: tuple[int, int]):
        """SAM's absolute position embedding ``(1, h, w, C)`` resized to the token grid."""
        pos = self.encoder.pos_embed
        if pos is None or tuple(pos.shape[1:3]) == hw:
            return pos
        grid = F.interpolate(pos.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    def block_input(self, pixel_values):
        # The projection itself: SamPatchEmbeddings refuses sizes other than the configured one.
        x = self.encoder.patch_embed.projection(pixel_values).permute(0, 2, 3, 1)
        pos = self.position_embedding(tuple(x.shape[1:3]))
        return x + pos if pos is not None else x

    def block_map(self, index, x):
        return x.permute(0, 3, 1, 2)

    def neck_map(self, x):
        return self.encoder.neck(x)

    def config_dict(self):
        levels = [NECK if i == self.num_blocks else i for i in self.out_indices]
        return {"name": self.name, "config": self.encoder.config.to_dict(), "out_indices": levels}


def build_sam(source=None, config=None, out_indices=None) -> SamBackbone:
    """SAM's image encoder from a hub id / transformers folder / saved folder, or random.

    Args:
        source: ``facebook/sam-vit-base``, a transformers folder of a ``SamModel`` (the prompt
            encoder and mask decoder are dropped) or ``SamVisionModel``, a pivotseg backbone
            folder, or ``None`` for random weights.
        config: random weights: ``{"variant": "vit_b", ...}`` plus any ``SamVisionConfig``
            field; with a source: ``from_pretrained`` keyword arguments.
        out_indices: block indices and/or ``"neck"``; default four evenly spread blocks.

    Raises:
        CheckpointError: the source is not a SAM checkpoint or its keys do not fit.
    """
    if is_saved_folder(source):

        def make(saved, levels):
            return SamBackbone(vision_encoder(saved["config"]), levels)

        return load_saved_folder(source, out_indices, make)
    if source is not None:
        model = load_transformers(source, "sam", model_types(), **(config or {}))
        return SamBackbone(model.vision_encoder, out_indices)
    variant, overrides = choose_preset("sam", PRESETS, config, "vit_b")
    # transformers' SAM default (1e-10) assumes a checkpoint follows; random weights need more.
    vision = {"initializer_range": 0.02, **PRESETS[variant], **overrides}
    return SamBackbone(vision_encoder(vision), out_indices)
