"""Backbones behind one interface (:class:`~pivotseg.backbones.base.Backbone`).

``build_backbone(name, source)`` looks the name up in :data:`BACKBONES`, a plain dictionary of
``"module:function"`` builders imported on first use (so that importing pivotseg does not import
every model). ``source`` is a Hugging Face id, a local folder (``save_pretrained`` output or a
transformers folder) or a checkpoint file; ``None`` builds random weights from ``config``.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from pivotseg.backbones.base import CONFIG_NAME, Backbone
from pivotseg.errors import ConfigError

BACKBONES: dict[str, str] = {
    "dinov2": "pivotseg.backbones.dinov2:build_dinov2",
    "dinov2_reg": "pivotseg.backbones.dinov2:build_dinov2_reg",
    "clip": "pivotseg.backbones.clip:build_clip",
    "siglip": "pivotseg.backbones.siglip:build_siglip",
    "sam": "pivotseg.backbones.sam:build_sam",
    "sam2": "pivotseg.backbones.sam2:build_sam2",
    "eva02": "pivotseg.backbones.eva02:build_eva02",
    "clip_resnet": "pivotseg.backbones.clip_resnet:build_clip_resnet",
    "tinyvit": "pivotseg.backbones.tinyvit:build_tinyvit",
}

BUILDER_ARGS = ("source", "config", "out_indices")


def build_backbone(
    name: str | None = None,
    source: str | Path | None = None,
    config: dict[str, Any] | None = None,
    out_indices: list[int] | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone by short name; see the module docstring for ``source``.

    Args:
        name: a key of :data:`BACKBONES`; may be omitted when ``source`` is a folder written by
            :meth:`Backbone.save_pretrained` (the name is read from it).
        source: where the weights come from, or ``None`` for random weights.
        config: architecture settings (overrides of the named preset, or a full config).
        out_indices: blocks whose outputs become feature maps.
    """
    if source is not None and Path(source).is_dir() and (Path(source) / CONFIG_NAME).exists():
        saved = json.loads((Path(source) / CONFIG_NAME).read_text())
        if name is not None and name != saved["name"]:
            raise ConfigError(
                f"{source}: holds a {saved['name']!r} backbone, not {name!r}; "
                f"use name={saved['name']!r} or another folder"
            )
        name = saved["name"]
    if name is None:
        raise ConfigError("build_backbone: give a backbone name; known: " + ", ".join(BACKBONES))
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    module_name, fn_name = BACKBONES[name].split(":")
    builder = getattr(importlib.import_module(module_name), fn_name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in BUILDER_ARGS]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"backbone_kwargs: {name} takes no {key!r}; it takes {', '.join(accepted) or 'none'}"
            )
    return builder(source=source, config=config, out_indices=out_indices, **kwargs)


__all__ = ["BACKBONES", "Backbone", "build_backbone"]
