"""Tuning methods: how a backbone is adapted (``frozen``, ``full``, ``lora``, ``rein``, ``dpft``).

``build_method(name, backbone, num_classes, **args)`` looks the name up in :data:`METHODS`,
checks the arguments against the method's constructor and attaches it to the backbone.
"""

from __future__ import annotations

from typing import Any

from pivotseg.backbones.base import Backbone
from pivotseg.errors import ConfigError
from pivotseg.naming import accepted_kwargs, check_kwargs, hint
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
# Passed by build_method itself, not settable through method_args.
BUILDER_ARGS = ("backbone", "num_classes")


def method_options(name: str) -> list[str]:
    """The keyword arguments method ``name`` accepts (its ``method_args``)."""
    return accepted_kwargs(METHODS[name], skip=BUILDER_ARGS)


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
        raise ConfigError(f"unknown tuning method {name!r}; {hint(name, METHODS)}")
    check_kwargs(
        args, METHODS[name], where="model.method_args", owner=f"method {name!r}", skip=BUILDER_ARGS
    )
    method = METHODS[name](backbone, num_classes, **args)
    method.attach(backbone)
    return method


__all__ = ["METHODS", "TuningMethod", "build_method", "method_options"]
