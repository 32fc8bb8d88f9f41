"""Training checkpoints: trainable weights, optimiser, schedule and random state, no pickle.

A checkpoint is a folder::

    segmenter.json, model.safetensors     what ``save_model(folder)`` writes (trainable tensors)
    optimizer.safetensors, optimizer.json  optimiser tensors / everything else in its state dict
    rng.safetensors                        random-generator tensors of every process
    trainer_state.json                     iteration, scheduler, grad scaler, RNG scalars, ...

Nested state dicts are split into tensors (safetensors) and a JSON skeleton that points at them,
so loading never unpickles anything. Folders are written under a temporary name and renamed, so
an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pivotseg.errors import CheckpointError

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"
_ITER_NAME = re.compile(r"iter_\d+")


# ----- nested state <-> (tensors, JSON skeleton) --------------------------------------------------
def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor/array in ``obj`` by a reference; collect them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(
            obj.astype(np.int64 if obj.dtype.kind in "iu" else obj.dtype)
        )
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {
            "__items__": [[k, split_tensors(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {
            "__tuple__": [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        }
    if isinstance(obj, list):
        return [split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        return {k: join_tensors(v, tensors) for k, v in obj["__items__"]}
    return obj


def save_nested(state: Any, folder: Path, name: str) -> None:
    """Write ``state`` as ``name.safetensors`` + ``name.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors(state, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_nested(folder: Path, name: str) -> Any:
    skeleton = read_json(folder / f"{name}.json")
    return join_tensors(skeleton, read_tensors(folder / f"{name}.safetensors"))


# ----- reading with one-line errors -------------------------------------------------------------
def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``load_file(path)``; a missing, empty or truncated file is a one-line CheckpointError
    that names the file and the run's other checkpoints."""
    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        reason = "missing" if not path.exists() else f"unreadable ({_first_line(err)})"
        raise CheckpointError(f"{path}: {reason}; {other_checkpoints_hint(path.parent)}") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        reason = "missing" if not path.exists() else f"unreadable ({_first_line(err)})"
        raise CheckpointError(f"{path}: {reason}; {other_checkpoints_hint(path.parent)}") from None


def _first_line(err: BaseException) -> str:
    return next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse tensors holding NaN or infinity: a model from them predicts nothing meaningful."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} of {len(state)} tensors hold NaN or infinite values (e.g. "
            f"{', '.join(bad[:3])}); training diverged before this save; "
            f"{other_checkpoints_hint(Path(where).parent)}"
        )


def iteration_folders(checkpoints: Path) -> list[Path]:
    """The ``iter_*`` checkpoint folders under ``checkpoints``, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if _ITER_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len("iter_") :]))


def other_checkpoints_hint(folder: Path) -> str:
    """Where to go instead of checkpoint ``folder``: the run's other ``iter_*`` folders."""
    if folder.parent.name != "checkpoints":
        return "write this checkpoint again or use another one"
    others = [p for p in iteration_folders(folder.parent) if not _same_checkpoint(p, folder)]
    if not others:
        return "the run holds no other checkpoint; train it again"
    names = ", ".join(p.name for p in others[-3:])
    return (
        f"the run's other checkpoints: {names}; pass one instead, e.g. {others[-1]} "
        f"(pivotseg eval/predict {others[-1]}, or pivotseg train --resume {others[-1]})"
    )


def _same_checkpoint(a: Path, b: Path) -> bool:
    """``last`` holds hard links to the files of the newest ``iter_*``: the same damage."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a / MODEL_FILE, b / MODEL_FILE)
    except OSError:
        return False


# ----- random state ---------------------------------------------------------------------------
def capture_rng() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states of this process."""
    version, internal, gauss = random.getstate()
    state = {
        # 625 integers: an array keeps them out of the JSON skeleton
        "python": (version, np.asarray(internal, dtype=np.int64), gauss),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set this process's generators to a :func:`capture_rng` result."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ----- model tensors ---------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.trainable_state_dict()`` if it has one, else its parameters that need gradients."""
    if hasattr(model, "trainable_state_dict"):
        return model.trainable_state_dict()
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, folder: Path) -> None:
    """Default ``save_model``: the trainable tensors as ``model.safetensors``."""
    state = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
    save_file(state, str(Path(folder) / MODEL_FILE))


def load_trainable(model: nn.Module, folder: Path) -> None:
    """Load ``model.safetensors`` of a checkpoint into ``model``, exactly its trainable keys."""
    path = Path(folder) / MODEL_FILE
    state = read_tensors(path)
    check_finite(state, path)
    expected = set(trainable_state(model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit this model ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); resume with the run's own "
            "config.yaml"
        )
    model.load_state_dict(state, strict=False)


# ----- whole checkpoints -------------------------------------------------------------------
def save_checkpoint(
    folder: str | Path,
    *,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    rng_states: list[dict],
) -> Path:
    """Write a checkpoint folder atomically (temporary name, then rename).

    Args:
        folder: the checkpoint folder to (re)write.
        save_model: writes the model's files into the folder it is given.
        optimizer: its ``state_dict()`` is stored.
        trainer_state: JSON-able loop state (iteration, scheduler, scaler, ...).
        rng_states: :func:`capture_rng` of every process, in rank order.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp)
    save_nested(optimizer.state_dict(), tmp, "optimizer")
    rng_tensors: dict[str, torch.Tensor] = {}
    rng_skeleton = split_tensors(rng_states, rng_tensors, "rng")
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = {**trainer_state, "rng": rng_skeleton}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    _replace(tmp, folder)
    return folder


def link_checkpoint(source: Path, target: Path) -> Path:
    """Make ``target`` (e.g. ``last``) a copy of checkpoint ``source``, by hard links if possible."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in source.iterdir():
        try:
            os.link(file, tmp / file.name)
        except OSError:
            shutil.copy2(file, tmp / file.name)
    _replace(tmp, target)
    return target


def _replace(tmp: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a run folder (its ``checkpoints/last``)."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    last = path / "checkpoints" / "last"
    if last.is_dir():
        return last
    found = iteration_folders(path / "checkpoints")
    if found:
        # e.g. a run stopped between writing iter_N and linking last, or last was deleted
        names = ", ".join(p.name for p in found[-3:])
        raise CheckpointError(
            f"{path}: has no checkpoints/last, but holds {names}; pass one of those folders, "
            f"e.g. {found[-1]}"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; give a run folder or a checkpoint folder")
    raise CheckpointError(
        f"{path}: neither a checkpoint (no {MODEL_FILE}) nor a run folder with checkpoints/last"
    )


def load_checkpoint_state(folder: str | Path) -> tuple[dict, dict, list[dict]]:
    """Read ``(trainer_state, optimizer_state_dict, rng_states)`` of a checkpoint folder."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(
            f"{folder}: not a training checkpoint ({STATE_FILE} missing); give a run folder or "
            "one of its checkpoints/ folders"
        )
    state = read_json(state_path)
    rng = join_tensors(state.pop("rng"), read_tensors(folder / "rng.safetensors"))
    optimizer = load_nested(folder, "optimizer")
    return state, optimizer, rng


def resolve_model_folder(path: str | Path) -> Path:
    """A folder holding ``segmenter.json``: the path itself or a run's ``checkpoints/last``."""
    path = Path(path)
    if (path / "segmenter.json").is_file():
        return path
    # Its message names the run's iter_* checkpoints when checkpoints/last is missing.
    folder = resolve_checkpoint(path)
    if not (folder / "segmenter.json").is_file():
        raise CheckpointError(
            f"{path}: no segmenter.json; give a run folder or a checkpoint folder of one"
        )
    return folder


def find_run_config(checkpoint: Path):
    """The ``config.yaml`` of the run a checkpoint belongs to, if there is one."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            from pivotseg.config import load_config  # config imports the backbones

            return load_config(path)
    return None
