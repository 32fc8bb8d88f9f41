"""Decode heads: backbone feature maps -> per-class scores (see :class:`~.base.Head`).

:data:`HEADS` is a plain dictionary of head classes; :func:`build_head` looks names up in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pivotseg.errors import ConfigError
from pivotseg.heads.base import Head
from pivotseg.heads.deeplabv3plus import DeepLabV3PlusHead
from pivotseg.heads.fpn import FPNHead
from pivotseg.heads.mask2former import Mask2FormerHead
from pivotseg.naming import check_kwargs, hint

HEADS: dict[str, type[Head]] = {
    "fpn": FPNHead,
    "mask2former": Mask2FormerHead,
    "deeplabv3plus": DeepLabV3PlusHead,
}
# Passed by build_head itself, not settable through head_args.
BUILDER_ARGS = ("in_dims", "in_strides", "num_classes")


def build_head(
    name: str, in_dims: Sequence[int], in_strides: Sequence[int], num_classes: int, **args: Any
) -> Head:
    """Build the head ``name`` for backbone levels of ``in_dims`` channels at ``in_strides``.

    Args:
        name: a key of :data:`HEADS`.
        in_dims, in_strides: ``backbone.out_dims`` and ``backbone.out_strides``.
        num_classes: number of classes K.
        **args: the head's own settings (see its class docstring).

    Raises:
        ConfigError: unknown head name or setting (naming the closest valid one).
    """
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; {hint(name, sorted(HEADS))}")
    cls = HEADS[name]
    check_kwargs(args, cls, where="model.head_args", owner=f"head {name!r}", skip=BUILDER_ARGS)
    return cls(list(in_dims), list(in_strides), num_classes, **args)


__all__ = ["HEADS", "Head", "build_head", "FPNHead", "Mask2FormerHead"]
