"""The run folder: what a training run leaves behind besides its checkpoints.

::

    RUN/config.yaml       the resolved configuration (train it again with ``pivotseg train``)
    RUN/env.json          versions, devices, world size, git commit
    RUN/metrics.jsonl     one JSON object per log step / evaluation
    RUN/tb/               TensorBoard events (only when tensorboard is installed)
    RUN/checkpoints/      iter_XXXXXXX/ every N iterations, last/ = the newest
    RUN/.pivotseg.lock    while a process trains in it (:mod:`pivotseg.engine.run_lock`)

Anything else in the folder (notes, an ``eval.json`` written there) belongs to the user:
:class:`RunClaim` never removes it.
"""

from __future__ import annotations

import fnmatch
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pivotseg.engine.run_lock import LOCK_NAME, RunLock
from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT

# What runs write into their folder (this module, the trainer, the dgss task with its class
# statistics, ``bench dg``); ``--overwrite`` replaces these and nothing else.
RUN_FILES = (
    "config.yaml",
    "env.json",
    "env_resume_*.json",
    "metrics.jsonl",
    "tb",
    "checkpoints",
    "class_stats.json",
    ".class_stats.json.*.tmp",
    "bench.json",
)


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


def is_run_file(name: str) -> bool:
    """Whether ``name`` (an entry of a run folder) is one that runs write."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


class RunClaim:
    """One run's hold on its folder: the lock, the check that a new run does not mix with the
    files of another, and the undoing of a start that failed before it trained.

    ``with RunClaim(path, resume=..., overwrite=...):`` wraps a run from set-up to the end.

    * A new run (``resume=False``) refuses a folder with anything in it (a finished or
      interrupted run, someone's notes) unless ``overwrite``; then :meth:`clear_previous`
      removes the earlier run's files (:data:`RUN_FILES`) and keeps everything else. Call it
      once set-up has succeeded, so that a failed start leaves the earlier run in place.
    * A new run that fails before it logged a metric or saved a checkpoint removes what it
      created (run files only; the folder and the parents it made, if they end up empty).
    * ``active=False`` (every process but the main one) does nothing.

    Raises:
        RunFolderBusy: another live process holds the folder (its pid, host and start named).
        ConfigError: a new run in a folder that is not empty, without ``overwrite``.
    """

    def __init__(
        self, path: str | Path, *, resume: bool = False, overwrite: bool = False, active=True
    ):
        self.path = Path(path)
        self.resume, self.overwrite, self.active = resume, overwrite, active
        self.lock = RunLock(self.path)
        self._before: set[str] = set()
        self._made: Path | None = None  # the highest folder this run created
        self._started = False

    def __enter__(self) -> RunClaim:
        if not self._started:
            self.start()
        return self

    def start(self) -> None:
        """Lock and check the folder (what ``with`` does, for callers that need it earlier)."""
        self._started = True
        if not self.active:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run_dir={self.path} is a file; set run_dir=<a folder>")
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._made = missing[-1] if missing else None
        try:
            self.lock.acquire()
            self._before = {e.name for e in self.path.iterdir() if e.name != LOCK_NAME}
            if not self.resume and self._before and not self.overwrite:
                raise ConfigError(self._refusal())
        except BaseException:
            self.lock.release()
            self._remove_empty_folders()
            raise

    def _refusal(self) -> str:
        path = self.path
        if (path / "checkpoints" / "last").is_dir():
            return (
                f"{path}: holds a run already; continue it with --resume {path}, start it afresh "
                "with --overwrite (overwrite=True in Python) or set run_dir=<another folder>"
            )
        names = sorted(self._before)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return (
            f"{path}: not empty ({shown}) and holds no run to resume; set run_dir=<another "
            "folder>, or pass --overwrite (overwrite=True in Python) to replace the files of an "
            "earlier run there (config.yaml, env.json, metrics.jsonl, tb/, checkpoints/; other "
            "files stay)"
        )

    def clear_previous(self) -> list[str]:
        """With ``overwrite``: remove the earlier run's files; returns their names."""
        if not (self.active and self.overwrite and not self.resume):
            return []
        removed = sorted(n for n in self._before if is_run_file(n))
        for name in removed:
            _remove(self.path / name)
        self._before -= set(removed)
        if removed:
            print(
                f"pivotseg: note: {self.path}: --overwrite removed the earlier run's "
                f"{', '.join(removed)}",
                file=sys.stderr,
            )
        return removed

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.active:
            return
        try:
            if exc_type is not None and not self.resume and not self._trained():
                for entry in self.path.iterdir():
                    if entry.name not in self._before and is_run_file(entry.name):
                        _remove(entry)
        finally:
            self.lock.release()
            self._remove_empty_folders()

    def _trained(self) -> bool:
        """Did this run log a metric or save a checkpoint?"""
        logged = "metrics.jsonl" not in self._before and (self.path / "metrics.jsonl").exists()
        saved = "checkpoints" not in self._before and (self.path / "checkpoints" / "last").exists()
        return logged or saved

    def _remove_empty_folders(self) -> None:
        if self._made is None:
            return
        for folder in (self.path, *self.path.parents):
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                return
            if folder == self._made:
                return


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)
