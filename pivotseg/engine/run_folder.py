"""The run folder: what a training run leaves behind besides its checkpoints.

::

    RUN/config.yaml       the resolved configuration (train it again with ``pivotseg train``)
    RUN/env.json          versions, devices, world size, git commit
    RUN/metrics.jsonl     one JSON object per log step / evaluation
    RUN/tb/               TensorBoard events (only when tensorboard is installed)
    RUN/checkpoints/      iter_XXXXXXX/ every N iterations, last/ = the newest
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pivotseg.paths import REPO_ROOT


def collect_env(world_size: int = 1, mixed_precision: str = "no") -> dict[str, Any]:
    """Versions, devices and the git commit of the code, for ``env.json``."""
    import accelerate
    import transformers

    import pivotseg

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "pivotseg": pivotseg.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else ["cpu"],
        "world_size": world_size,
        "mixed_precision": mixed_precision,
        "git_commit": git_commit(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def git_commit() -> str | None:
    """The checked-out commit of the pivotseg source tree (``+dirty`` if modified), or None."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


class RunFolder:
    """Writes ``env.json``, ``metrics.jsonl`` and TensorBoard scalars of one run.

    Only the main process should create one with ``active=True``; the others get an inactive
    instance whose methods do nothing, so that calling code needs no rank checks.
    """

    def __init__(self, path: str | Path, active: bool = True, tensorboard: bool = True):
        self.path = Path(path)
        self.active = active
        self._tb = None
        if not active:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: tensorboard is not a dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.path / "tb"))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_env(self, env: dict, name: str = "env.json") -> None:
        if self.active:
            (self.path / name).write_text(json.dumps(env, indent=2))

    def write_text(self, name: str, text: str) -> None:
        if self.active:
            (self.path / name).write_text(text)

    def log(self, record: dict, step: int) -> None:
        """Append ``record`` (plus ``iter``) to metrics.jsonl; numbers also go to TensorBoard."""
        if not self.active:
            return
        record = _jsonable({"iter": step, **record})
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in _flat_numbers(record):
                if key != "iter":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def truncate_metrics(self, after_iteration: int) -> None:
        """Drop records logged after ``after_iteration`` (an interrupted run's tail) on resume."""
        if not self.active or not self.metrics_file.exists():
            return
        lines = self.metrics_file.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["iter"] <= after_iteration]
        self.metrics_file.write_text("".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _flat_numbers(record: dict, prefix: str = ""):
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_numbers(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            yield name, value
