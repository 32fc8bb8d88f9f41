"""Tuning methods: how a backbone is adapted (``frozen``, ``full``, ``lora``, ``rein``, ``dpft``).

``build_method(name, backbone, num_classes, **args)`` looks the name up in :data:`METHODS`,
checks the arguments against the method's constructor and attaches it to the backbone.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError
from pivotseg.tuning.base import TuningMethod
from pivotseg.tuning.dpft import DPFT
from pivotseg.tuning.famix import FAMix
from pivotseg.tuning.frozen import Frozen
from pivotseg.tuning.full import Full
from pivotseg.tuning.lora import LoRA
from pivotseg.tuning.rein import Rein

METHODS: dict[str, type[TuningMethod]] = {
    "frozen": Frozen,
    "full": Full,
    "lora": LoRA,
    "rein": Rein,
    "dpft": DPFT,
    "famix": FAMix,
}


def method_options(name: str) -> list[str]:
    """The keyword arguments method ``name`` accepts (its ``method_args``)."""
    params = inspect.signature(METHODS[name].__init__).parameters
    return [p for p in params if p not in ("self", "backbone", "num_classes")]


def build_method(name: str, backbone: Backbone, num_classes: int, **args: Any) -> TuningMethod:
    """Build tuning method ``name`` for ``backbone`` and attach it.

    Args:
        name: a key of :data:`METHODS`.
        backbone: the backbone to adapt (hooks/adapters are added to it).
        num_classes: classes of the task (DPFT's class prompts and pivots).
        **args: the method's options (see each class); ``method.config()`` returns them.

    Raises:
        ConfigError: unknown method or option, or a backbone the method cannot adapt.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown tuning method {name!r}; known: {', '.join(METHODS)}")
    options = method_options(name)
    for key in args:
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"model.method_args: {name} has no option {key!r}; {hint}options: "
                + ", ".join(options)
            )
    method = METHODS[name](backbone, num_classes, **args)
    method.attach(backbone)
    return method


__all__ = ["METHODS", "TuningMethod", "build_method", "method_options"]
