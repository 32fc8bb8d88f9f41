"""Which adaptation a run's tuning method allows, and building it."""

from __future__ import annotations

from pivotseg.errors import ConfigError
from pivotseg.segmenter import Segmenter
from pivotseg.tasks.adapt.params import norm_affine_parameters
from pivotseg.tasks.adapt.replay import SourceReplay
from pivotseg.tasks.adapt.selftrain import SelfTrainer
from pivotseg.tasks.adapt.settings import AdaptSettings
from pivotseg.tasks.adapt.tent import Tent
from pivotseg.tasks.adapt.uda import ReplayTrainer
from pivotseg.tuning.base import TuningMethod


def _has_pivots(model: Segmenter) -> bool:
    tuning = model.tuning
    return hasattr(tuning, "cached_pivot_tokens") and bool(getattr(tuning, "uses_pivots", False))


def _declares_parameters(model: Segmenter) -> bool:
    return any(True for _ in model.tuning.adaptable_parameters())


def capabilities() -> str:
    """Which tuning methods each adaptation accepts, for error messages."""
    from pivotseg.tuning import METHODS

    declared = [
        name
        for name, cls in METHODS.items()
        if cls.adaptable_parameters is not TuningMethod.adaptable_parameters
    ]
    pivots = [name for name, cls in METHODS.items() if hasattr(cls, "cached_pivot_tokens")]
    return (
        f"spl adapts {', '.join(pivots)} runs with set pivots (presence_gating or pivot_loss "
        f"on); selftrain adapts {', '.join(declared)} runs; tent adapts any run with "
        "normalisation layers"
    )


def resolve_method(model: Segmenter, requested: str) -> str:
    """The adaptation to run: ``requested``, or for ``auto`` selftrain when the run's method
    declares adaptable parameters, else tent. ``auto`` never picks spl: its pivot update and
    pivot loss changed nothing measurable (spl − selftrain on DPFT: 0.00 mIoU paired over 3
    seeds, on the proxy and both targets; docs/methods.md, "SPL mode"), so it is run only when
    asked for.

    Raises:
        ConfigError: the run's tuning method cannot adapt that way (names the ones that can).
    """
    method = model.config.method
    if requested == "auto":
        return "selftrain" if _declares_parameters(model) else "tent"
    if requested == "spl" and not _has_pivots(model):
        if hasattr(model.tuning, "cached_pivot_tokens"):
            # DPFT's pivots are off by default (docs/methods.md, "SPL mode"): say how to get them.
            raise ConfigError(
                f"a {method} run without set pivots cannot adapt with spl (it was trained with "
                "pivot_loss and presence_gating off, the defaults); adapt it with selftrain "
                "(--method selftrain, or --adapt-method selftrain with predict), or train "
                f"{method} with model.method_args pivot_loss: true (and/or presence_gating: "
                "true with class_prompts: true) to have pivots"
            )
        reason = "it has no set pivots"
    elif requested == "selftrain" and not _declares_parameters(model):
        reason = "it declares no adaptable parameters"
    elif requested == "tent" and not norm_affine_parameters(model):
        reason = "it has no normalisation layer"
    else:
        return requested
    raise ConfigError(
        f"a {method} run cannot adapt with {requested} ({reason}); {capabilities()}; pick "
        "one of those (--method, or --adapt-method with predict)"
    )


def build_adapter(
    model: Segmenter, settings: AdaptSettings, source: SourceReplay | None = None
) -> SelfTrainer | Tent:
    """The adapter of ``settings.method`` (``auto`` resolved) for ``model``; self-training
    replays ``source`` when given (offline), TENT never does."""
    method = resolve_method(model, settings.method)
    if method == "tent":
        return Tent(model, settings)
    if source is not None:
        return ReplayTrainer(model, settings, pivots=method == "spl", source=source)
    return SelfTrainer(model, settings, pivots=method == "spl")


def replays_source(model: Segmenter, settings: AdaptSettings) -> bool:
    """Whether an offline adaptation with ``settings`` trains on the source data too."""
    return settings.source_replay and resolve_method(model, settings.method) != "tent"
