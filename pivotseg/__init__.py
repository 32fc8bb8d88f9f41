"""pivotseg: vision foundation models adapted for segmentation that generalises.

The face of the library::

    cfg = pivotseg.load_config("configs/demo_dpft_tinyvit_camvid.yaml", ["train.iterations=50"])
    pivotseg.train(cfg)                            # a run folder (cfg.run_dir)
    pivotseg.evaluate(cfg.run_dir, ["idd=/data/idd_lite:idd_lite"])  # mIoU per target
    pivotseg.predict(cfg.run_dir, "images/", "out/", format="overlay")  # PNGs
    model = pivotseg.load_segmenter(cfg.run_dir)   # or build_segmenter(cfg.model)

Each name is imported on first use (PEP 562), so that ``import pivotseg`` (and the CLI's
start-up) loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load_config": "pivotseg.config",
    "build_segmenter": "pivotseg.segmenter",
    "load_segmenter": "pivotseg.segmenter",
    "train": "pivotseg.tasks.dgss",
    "evaluate": "pivotseg.tasks.dgss",
    "predict": "pivotseg.tasks.dgss",
}

__all__ = [
    "__version__",
    "build_segmenter",
    "evaluate",
    "load_config",
    "load_segmenter",
    "predict",
    "train",
]

if TYPE_CHECKING:
    from pivotseg.config import load_config
    from pivotseg.segmenter import build_segmenter, load_segmenter
    from pivotseg.tasks.dgss import evaluate, predict, train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pivotseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
