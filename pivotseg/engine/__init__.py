"""Training machinery that knows nothing of segmentation: loop, schedules, checkpoints, runs.

:class:`Trainer` runs an iteration-based loop on accelerate (DDP under torchrun, autocast,
gradient accumulation to honour the global batch, clipping, periodic evaluation, exact resume).
Tasks (``pivotseg.tasks.dgss``) plug a model, datasets and an evaluation function into it.
"""

from pivotseg.engine.checkpoint import load_checkpoint_state, save_checkpoint
from pivotseg.engine.distributed import make_accelerator, resolve_mixed_precision
from pivotseg.engine.optim import accumulation_steps, build_optimizer, default_param_groups
from pivotseg.engine.run_folder import RunFolder, collect_env, read_metrics
from pivotseg.engine.sampler import InfiniteSampler, SeededItems, shard_indices
from pivotseg.engine.schedule import build_scheduler, warmup_poly_factor
from pivotseg.engine.trainer import NonFiniteLoss, Trainer, TrainingStopped

__all__ = [
    "InfiniteSampler",
    "NonFiniteLoss",
    "RunFolder",
    "SeededItems",
    "Trainer",
    "TrainingStopped",
    "accumulation_steps",
    "build_optimizer",
    "build_scheduler",
    "collect_env",
    "default_param_groups",
    "load_checkpoint_state",
    "make_accelerator",
    "read_metrics",
    "resolve_mixed_precision",
    "save_checkpoint",
    "shard_indices",
    "warmup_poly_factor",
]
