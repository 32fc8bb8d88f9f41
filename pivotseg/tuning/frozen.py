"""``frozen``: the backbone is a fixed feature extractor; only the head trains."""

from __future__ import annotations

from pivotseg.backbones.base import Backbone
from pivotseg.tuning.base import TuningMethod


class Frozen(TuningMethod):
    """Freeze every backbone parameter (and keep the backbone in eval mode)."""

    name = "frozen"

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__(backbone, num_classes)

    def attach(self, backbone: Backbone) -> None:
        backbone.freeze()
