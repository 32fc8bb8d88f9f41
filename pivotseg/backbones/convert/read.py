"""Reading released checkpoints without running code from them.

A ``.pth`` file is a pickle: unpickled in full it can run any code. Released files are read
only with ``torch.load(weights_only=True)``, whose restricted unpickler admits tensors and
plain containers and refuses everything else; a refusal becomes a one-line
:class:`~pivotseg.errors.CheckpointError` naming the objects it met and how to strip them in an
environment where the file is trusted. ``.safetensors`` files are read as they are.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pivotseg.errors import CheckpointError

SAFETENSORS = ".safetensors"


def load_released(path: str | Path) -> Any:
    """The object a ``.pth`` (weights-only) or ``.safetensors`` file holds.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, or holds objects other than
            tensors and plain containers (named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give the checkpoint file you downloaded")
    if path.suffix == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{path}: not a readable .safetensors file ({_line(err)})"
            ) from None
    try:
        return torch.load(str(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise CheckpointError(_refusal(path, err)) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint pivotseg can read ({_line(err)}); give a .pth "
            "file written by torch.save or a .safetensors file"
        ) from None


def _refusal(path: Path, err: BaseException) -> str:
    names: list[str] = []
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            names = sorted(finder(str(path)))
        except Exception:  # a damaged archive: the unpickler's own reason is named instead
            names = []
    held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    what = (
        f"pickled objects other than tensors ({held})"
        if held
        else (f"something the weights-only reader refuses ({_line(err)})")
    )
    return (
        f"{path}: refused: it holds {what}, and pivotseg reads .pth files only with "
        "torch.load(weights_only=True), which runs no code from the file; where you trust the "
        "file, keep only its tensors: torch.save(torch.load(F, weights_only=False)"
        "['state_dict'], 'plain.pth') (or the whole dict if it has no 'state_dict')"
    )


def _line(err: BaseException) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


def tensor_dict(obj: Any, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a loaded checkpoint: a plain state dict, or mmengine's
    ``{"state_dict": ..., "meta": ...}``; ``meta`` is ``{}`` when there is none.

    Raises:
        CheckpointError: it is not a dict of tensors (the first other entry named).
    """
    meta: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (names -> tensors); give "
            "the model's weights file"
        )
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; give a plain "
                "state dict or mmengine's {'state_dict': ..., 'meta': ...}"
            )
    return dict(obj), meta
