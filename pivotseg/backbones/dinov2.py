"""DINOv2 through transformers' ``Dinov2Model`` (wrapped, not forked).

Two names: ``dinov2`` (``Dinov2Model``) and ``dinov2_reg`` (``Dinov2WithRegistersModel``, the
"Vision Transformers Need Registers" checkpoints); both share :class:`Dinov2ViTBackbone`, which
drops the class and register tokens from the feature maps and hooks (named so as not to clash
with transformers' own ``Dinov2Backbone``).

Rein and DPFT run DINOv2 at patch 16 instead of 14 so that a 512 crop gives a 32x32 grid:
:func:`convert_patch_size` resizes the patch-embedding kernel and the position embedding
bicubically, as Rein's conversion script does.

Loading from the hub or a transformers folder goes through :mod:`pivotseg.backbones.hf`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pivotseg.backbones.base import (
    Backbone,
    choose_preset,
    is_saved_folder,
    load_saved_folder,
    tokens_to_map,
)
from pivotseg.backbones.hf import load_transformers

if TYPE_CHECKING:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

# The published sizes (facebook/dinov2-{small,base,large,giant}).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True
    ),
}
HUB_IDS = {k: f"facebook/dinov2-{k}" for k in PRESETS}
REG_HUB_IDS = {k: f"facebook/dinov2-with-registers-{k}" for k in PRESETS}


def model_class(name: str) -> type:
    """The transformers model class behind backbone ``name`` (``dinov2`` or ``dinov2_reg``)."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if name == "dinov2_reg" else Dinov2Model


class Dinov2ViTBackbone(Backbone):
    name = "dinov2"

    def __init__(self, model: Dinov2Model | Dinov2WithRegistersModel, out_indices=None):
        super().__init__(out_indices)
        self.model = model
        if model.config.model_type == "dinov2_with_registers":
            self.name = "dinov2_reg"
        self.patch_size = self.size_divisor = model.config.patch_size
        self._prefix = 1 + getattr(model.config, "num_register_tokens", 0)

    @property
    def blocks(self):
        return list(self.model.encoder.layer)

    @property
    def block_dims(self):
        return [self.model.config.hidden_size] * self.model.config.num_hidden_layers

    def block_strides(self):
        return [self.patch_size] * self.model.config.num_hidden_layers

    def _split_block_output(self, index, output):
        tensor = output[0] if isinstance(output, tuple) else output
        prefix, tokens = tensor[:, : self._prefix], tensor[:, self._prefix :]

        def rebuild(new_tokens):
            out = torch.cat([prefix, new_tokens], dim=1)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return tokens, self._current_hw, rebuild

    def block_input(self, pixel_values):
        h, w = pixel_values.shape[-2:]
        self._current_hw = (h // self.patch_size, w // self.patch_size)
        return self.model.embeddings(pixel_values)

    def block_map(self, index, x):
        # Rein/DINOv2 segmentation read intermediate blocks without the final LayerNorm.
        return tokens_to_map(x[:, self._prefix :], self._current_hw)

    def config_dict(self):
        return {
            "name": self.name,
            "config": self.model.config.to_dict(),
            "out_indices": self._out_indices,
        }


def convert_patch_size(model: Dinov2Model, patch_size: int, image_size: int = 512) -> Dinov2Model:
    """Resize patch-embedding kernel and position grid bicubically (Rein's 14 -> 16 conversion)."""
    cfg = model.config
    if cfg.patch_size == patch_size:
        return model
    emb = model.embeddings
    proj = emb.patch_embeddings.projection
    weight = F.interpolate(
        proj.weight.data.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False
    )
    new_proj = torch.nn.Conv2d(proj.in_channels, proj.out_channels, patch_size, patch_size)
    new_proj.weight.data.copy_(weight)
    new_proj.bias.data.copy_(proj.bias.data)
    emb.patch_embeddings.projection = new_proj
    pos = emb.position_embeddings.data
    cls_pos, grid_pos = pos[:, :1], pos[:, 1:]
    old = int(grid_pos.shape[1] ** 0.5)
    new = image_size // patch_size
    grid = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    emb.position_embeddings = torch.nn.Parameter(torch.cat([cls_pos, grid.to(pos.dtype)], dim=1))
    emb.patch_size = patch_size
    emb.patch_embeddings.patch_size = (patch_size, patch_size)
    cfg.patch_size, cfg.image_size = patch_size, image_size
    return model


def _build(name, source, config, out_indices, patch_size):
    cls = model_class(name)
    if is_saved_folder(source):

        def make(saved, levels):
            return Dinov2ViTBackbone(cls(cls.config_class(**saved["config"])), levels)

        return load_saved_folder(source, out_indices, make)
    if source is not None:
        model = load_transformers(
            source, name, {cls.config_class.model_type: cls}, **(config or {})
        )
    else:
        variant, overrides = choose_preset(name, PRESETS, config, "small")
        model = cls(cls.config_class(**{**PRESETS[variant], **overrides}))
    if patch_size is not None:
        convert_patch_size(model, patch_size, image_size=32 * patch_size)
    return Dinov2ViTBackbone(model, out_indices)


def build_dinov2(source=None, config=None, out_indices=None, patch_size: int | None = None):
    """DINOv2 from a hub id / transformers folder / saved folder, or random from a preset.

    Args:
        source: ``facebook/dinov2-large``, a local folder, or ``None`` for random weights.
        config: ``{"variant": "large", ...}`` plus any ``Dinov2Config`` field.
        patch_size: convert to this patch size after loading (16 for Rein/DPFT recipes).

    Raises:
        CheckpointError: the source is another kind of model or its keys do not fit.
    """
    return _build("dinov2", source, config, out_indices, patch_size)


def build_dinov2_reg(source=None, config=None, out_indices=None, patch_size: int | None = None):
    """DINOv2 with 4 register tokens (``facebook/dinov2-with-registers-*``); see build_dinov2."""
    return _build("dinov2_reg", source, config, out_indices, patch_size)
