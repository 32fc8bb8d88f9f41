"""Process-group helpers: the Accelerator, mixed precision, reductions that work with 1 process.

Multi-process runs are started by ``torchrun`` (or ``srun torchrun``); accelerate reads the
environment torchrun sets and initialises the process group (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist


def resolve_mixed_precision(requested: str, cpu: bool = False) -> str:
    """The precision the device can run: ``fp16`` needs a GPU, bf16 a GPU that has it.

    Falls back (with a warning) instead of failing, so one config runs on a laptop and a GPU.
    """
    if requested not in ("no", "bf16", "fp16"):
        from pivotseg.errors import ConfigError

        raise ConfigError(f"train.mixed_precision={requested!r}; use no, bf16 or fp16")
    cuda = torch.cuda.is_available() and not cpu
    if requested == "fp16" and not cuda:
        warnings.warn("fp16 needs a GPU; training in full precision on the CPU", stacklevel=2)
        return "no"
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        warnings.warn("this GPU has no bf16; using fp16 with loss scaling instead", stacklevel=2)
        return "fp16"
    return requested


def make_accelerator(
    mixed_precision: str = "no", find_unused_parameters: bool = False, cpu: bool = False
):
    """An :class:`accelerate.Accelerator` for this process (DDP when torchrun started several).

    Gradient accumulation, scheduler stepping and data sharding are done by the trainer, so the
    Accelerator only wraps the model (DDP, autocast) and the optimiser (loss scaling).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process and refuses a second Accelerator with
    # another precision; several runs in one Python process (notebooks, tests) need a fresh
    # one. The process group itself (PartialState) is kept.
    AcceleratorState._reset_state()
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cpu = True  # accelerate only sets up multi-process CPU (gloo) when told it is on CPU
    precision = resolve_mixed_precision(mixed_precision, cpu=cpu)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp])


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (no-op with one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
