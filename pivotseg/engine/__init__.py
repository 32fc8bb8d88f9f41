"""Training machinery that knows nothing of segmentation: loop, schedules, checkpoints, runs.

:class:`Trainer` runs an iteration-based loop on accelerate (DDP under torchrun, autocast,
gradient accumulation to honour the global batch, clipping, periodic evaluation, exact resume).
Tasks (``pivotseg.tasks.dgss``) plug a model, datasets and an evaluation function into it.

Exported here: what a task needs to train (:class:`Trainer`, :func:`make_accelerator`), what its
callers catch (:class:`TrainingStopped`, :class:`NonFiniteLoss`) and what reads a run folder
(:func:`read_metrics`). Optimiser, schedule, sampler and checkpoint helpers live in their
modules (``pivotseg.engine.optim``, ``.schedule``, ``.sampler``, ``.checkpoint``...).
"""

from pivotseg.engine.distributed import make_accelerator
from pivotseg.engine.run_folder import read_metrics
from pivotseg.engine.trainer import NonFiniteLoss, Trainer, TrainingStopped

__all__ = [
    "NonFiniteLoss",
    "Trainer",
    "TrainingStopped",
    "make_accelerator",
    "read_metrics",
]
