"""Backbones behind one interface (:class:`~pivotseg.backbones.base.Backbone`).

``build_backbone(name, source)`` looks the name up in :data:`BACKBONES`, a plain dictionary of
builders. ``source`` is a Hugging Face id, a local folder (``save_pretrained`` output or a
transformers folder) or a checkpoint file; ``None`` builds random weights from ``config``.

The backbone modules import transformers inside their functions only, so importing this package
costs torch and nothing more.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pivotseg.backbones.base import CONFIG_NAME, Backbone
from pivotseg.backbones.clip import build_clip
from pivotseg.backbones.clip_resnet import build_clip_resnet
from pivotseg.backbones.dinov2 import build_dinov2, build_dinov2_reg
from pivotseg.backbones.eva02 import build_eva02
from pivotseg.backbones.sam import build_sam
from pivotseg.backbones.sam2 import build_sam2
from pivotseg.backbones.siglip import build_siglip
from pivotseg.backbones.tinyvit import build_tinyvit
from pivotseg.errors import ConfigError

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "dinov2": build_dinov2,
    "dinov2_reg": build_dinov2_reg,
    "clip": build_clip,
    "siglip": build_siglip,
    "sam": build_sam,
    "sam2": build_sam2,
    "eva02": build_eva02,
    "clip_resnet": build_clip_resnet,
    "tinyvit": build_tinyvit,
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
    builder = BACKBONES[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in BUILDER_ARGS]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"backbone_kwargs: {name} takes no {key!r}; it takes {', '.join(accepted) or 'none'}"
            )
    return builder(source=source, config=config, out_indices=out_indices, **kwargs)


__all__ = ["BACKBONES", "Backbone", "build_backbone"]
