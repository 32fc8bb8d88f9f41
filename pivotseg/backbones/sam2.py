"""SAM2's Hiera image trunk through transformers' ``Sam2HieraDetModel`` (wrapped, not forked).

Hiera is hierarchical: four stages at strides 4, 8, 16 and 32 whose widths double, and the first
block of stages 2-4 pools its queries (halving the grid). Blocks output ``(B, H, W, C)`` maps,
which hooks see as ``(B, H*W, C)`` tokens. Default feature levels: the last block of each stage.

Input sizes must be multiples of :attr:`Sam2Backbone.size_divisor`: the total stride (32) and the
patch stride times the first window (4 x 8 = 32 for the published models), because the windowed
position embedding is tiled over the stride-4 grid. The background position embedding is
resized bicubically by transformers itself, so any such size runs.

Only the trunk is kept: SAM2's FPN neck feeds its mask decoder and memory, and segmentation heads
build their own pyramid from the four stages.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pivotseg.backbones.base import (
    Backbone,
    choose_preset,
    is_saved_folder,
    load_saved_folder,
    split_grid_output,
)
from pivotseg.backbones.hf import load_transformers

if TYPE_CHECKING:
    from transformers import Sam2HieraDetModel


def _hiera(dim: int, heads: int, blocks: list[int], global_blocks: list[int], **extra) -> dict:
    return dict(
        hidden_size=dim,
        num_attention_heads=heads,
        embed_dim_per_stage=[dim * 2**s for s in range(4)],
        num_attention_heads_per_stage=[heads * 2**s for s in range(4)],
        blocks_per_stage=blocks,
        global_attention_blocks=global_blocks,
        **extra,
    )


# SAM 2.1 trunks (facebookresearch/sam2 configs sam2.1_hiera_{t,s,b+,l}.yaml).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _hiera(96, 1, [1, 2, 7, 2], [5, 7, 9]),
    "small": _hiera(96, 1, [1, 2, 11, 2], [7, 10, 13]),
    "base_plus": _hiera(
        112, 2, [2, 3, 16, 3], [12, 16, 20], window_positional_embedding_background_size=[14, 14]
    ),
    "large": _hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], window_size_per_stage=[8, 4, 16, 8]),
}
HUB_IDS = {
    "tiny": "facebook/sam2.1-hiera-tiny",
    "small": "facebook/sam2.1-hiera-small",
    "base_plus": "facebook/sam2.1-hiera-base-plus",
    "large": "facebook/sam2.1-hiera-large",
}


def model_types() -> dict[str, type]:
    """``config.json`` model_type -> transformers class that holds a Hiera trunk."""
    from transformers import Sam2HieraDetModel, Sam2Model, Sam2VideoModel, Sam2VisionModel

    return {
        "sam2": Sam2Model,
        "sam2_video": Sam2VideoModel,
        "sam2_vision_model": Sam2VisionModel,
        "sam2_hiera_det_model": Sam2HieraDetModel,
    }


def hiera_trunk(config: dict[str, Any]) -> Sam2HieraDetModel:
    """A randomly initialised ``Sam2HieraDetModel`` of ``Sam2HieraDetConfig(**config)``."""
    from transformers import Sam2HieraDetConfig, Sam2HieraDetModel

    return Sam2HieraDetModel(Sam2HieraDetConfig(**config))


def hiera_of(model) -> Sam2HieraDetModel:
    """The Hiera trunk inside any of the :func:`model_types` models."""
    from transformers import Sam2HieraDetModel, Sam2VisionModel

    if isinstance(model, Sam2HieraDetModel):
        return model
    vision = model if isinstance(model, Sam2VisionModel) else model.vision_encoder
    return vision.backbone


class Sam2Backbone(Backbone):
    name = "sam2"

    def __init__(self, trunk: Sam2HieraDetModel, out_indices=None):
        super().__init__(out_indices)
        self.trunk = trunk
        cfg = trunk.config
        self.patch_size = cfg.patch_stride[0]
        strides = self.block_strides()
        self.size_divisor = math.lcm(strides[-1], self.patch_size * cfg.window_size_per_stage[0])

    @property
    def stage_ends(self) -> list[int]:
        return list(self.trunk.stage_ends)

    @property
    def out_indices(self) -> list[int]:
        if self._out_indices is None:
            return self.stage_ends
        return [i % self.num_blocks for i in self._out_indices]

    @out_indices.setter
    def out_indices(self, value) -> None:
        self._out_indices = list(value)

    @property
    def blocks(self):
        return list(self.trunk.blocks)

    @property
    def block_dims(self):
        return [block.dim_out for block in self.trunk.blocks]

    def block_strides(self):
        strides, stride = [], self.patch_size
        for block in self.trunk.blocks:
            if block.query_stride:
                stride *= block.query_stride[0]
            strides.append(stride)
        return strides

    def _split_block_output(self, index, output):
        return split_grid_output(output)

    def block_input(self, pixel_values):
        x = self.trunk.patch_embed(pixel_values)
        # The trunk's own resize of its background embedding plus the tiled window embedding.
        return x + self.trunk._get_pos_embed(x.shape[1:3])

    def block_map(self, index, x):
        return x.permute(0, 3, 1, 2)

    def config_dict(self):
        return {
            "name": self.name,
            "config": self.trunk.config.to_dict(),
            "out_indices": self._out_indices,
        }


def build_sam2(source=None, config=None, out_indices=None) -> Sam2Backbone:
    """SAM2's Hiera trunk from a hub id / transformers folder / saved folder, or random.

    Args:
        source: ``facebook/sam2.1-hiera-tiny``, a transformers folder of a ``Sam2Model``,
            ``Sam2VideoModel``, ``Sam2VisionModel`` or ``Sam2HieraDetModel`` (everything but the
            trunk is dropped), a pivotseg backbone folder, or ``None`` for random weights.
        config: random weights: ``{"variant": "tiny", ...}`` plus any ``Sam2HieraDetConfig``
            field; with a source: ``from_pretrained`` keyword arguments.
        out_indices: block indices; default the last block of each stage.

    Raises:
        CheckpointError: the source is not a SAM2 checkpoint or its keys do not fit.
    """
    if is_saved_folder(source):

        def make(saved, levels):
            return Sam2Backbone(hiera_trunk(saved["config"]), levels)

        return load_saved_folder(source, out_indices, make)
    if source is not None:
        model = load_transformers(source, "sam2", model_types(), **(config or {}))
        return Sam2Backbone(hiera_of(model), out_indices)
    variant, overrides = choose_preset("sam2", PRESETS, config, "tiny")
    return Sam2Backbone(hiera_trunk({**PRESETS[variant], **overrides}), out_indices)
