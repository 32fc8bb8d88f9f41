"""DINOv2 through transformers' ``Dinov2Model`` (wrapped, not forked).

Two names: ``dinov2`` (``Dinov2Model``) and ``dinov2_reg`` (``Dinov2WithRegistersModel``, the
"Vision Transformers Need Registers" checkpoints); both share :class:`Dinov2Backbone`, which drops
the class and register tokens from the feature maps and hooks.

Rein and DPFT run DINOv2 at patch 16 instead of 14 so that a 512 crop gives a 32x32 grid:
:func:`convert_patch_size` resizes the patch-embedding kernel and the position embedding
bicubically, as Rein's conversion script does.

Loading from the hub or a transformers folder goes through :mod:`pivotseg.backbones.hf`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from pivotseg.backbones.base import (
    Backbone,
    is_saved_folder,
    load_state_strict,
    read_saved_folder,
    tokens_to_map,
)
from pivotseg.backbones.hf import from_pretrained_checked, pick_model_class
from pivotseg.errors import ConfigError

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

# backbone name -> (transformers model_type, model class, config class)
ARCHITECTURES = {
    "dinov2": ("dinov2", Dinov2Model, Dinov2Config),
    "dinov2_reg": ("dinov2_with_registers", Dinov2WithRegistersModel, Dinov2WithRegistersConfig),
}


class Dinov2Backbone(Backbone):
    name = "dinov2"
    pixel_mean = (123.675, 116.28, 103.53)  # ImageNet statistics
    pixel_std = (58.395, 57.12, 57.375)

    def __init__(self, model: Dinov2Model | Dinov2WithRegistersModel, out_indices=None):
        super().__init__(out_indices)
        self.model = model
        if isinstance(model, Dinov2WithRegistersModel):
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

    def _grid(self, pixel_values):
        return pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size

    def _split_block_output(self, index, output):
        tensor = output[0] if isinstance(output, tuple) else output
        prefix, tokens = tensor[:, : self._prefix], tensor[:, self._prefix :]

        def rebuild(new_tokens):
            out = torch.cat([prefix, new_tokens], dim=1)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return tokens, self._current_hw, rebuild

    def forward_blocks(self, pixel_values, indices):
        self._current_hw = self._grid(pixel_values)
        wanted = set(indices)
        x = self.model.embeddings(pixel_values)
        maps = {}
        for i, layer in enumerate(self.model.encoder.layer):
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x
            if i in wanted:
                # Rein/DINOv2 segmentation read intermediate blocks without the final LayerNorm.
                maps[i] = tokens_to_map(x[:, self._prefix :], self._current_hw)
            if i >= max(wanted):
                break
        return [maps[i] for i in indices]

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
    model_type, model_class, config_class = ARCHITECTURES[name]
    config = dict(config or {})
    if is_saved_folder(source):
        saved, state = read_saved_folder(source)
        model = model_class(config_class(**saved["config"]))
        wrapper = Dinov2Backbone(model, out_indices or saved.get("out_indices"))
        load_state_strict(wrapper, state, source, f"pivotseg {name}")
        return wrapper
    if source is not None:
        pick_model_class(source, name, {model_type: model_class})
        model = from_pretrained_checked(
            model_class, source, f"transformers {model_class.__name__}", **config
        )
    else:
        variant = config.pop("variant", "small")
        if variant not in PRESETS:
            raise ConfigError(f"{name}: unknown variant {variant!r}; known: {', '.join(PRESETS)}")
        model = model_class(config_class(**{**PRESETS[variant], **config}))
    if patch_size is not None:
        convert_patch_size(model, patch_size, image_size=32 * patch_size)
    return Dinov2Backbone(model, out_indices)


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
