"""Output paths checked before any work: a command must not fail at its end for want of a place
to write (an evaluation's result lost, a half-made run folder).

Writability is probed by creating and removing a temporary folder next to where the output goes,
so that it holds for every user (``root`` included) and for read-only file systems.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pivotseg.errors import ConfigError


def check_output_dir(path: str | Path, setting: str) -> Path:
    """``path`` as a folder that exists or can be made and written in; nothing is created.

    Args:
        path: the output folder.
        setting: how the user gave it, for the message (``--out``, ``run_dir``).

    Raises:
        ConfigError: ``path`` is a file, lies under a file, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{setting} {path}: is a file, not a folder; give a folder path")
    _check_writable(path, setting)
    return path


def check_new_dir(path: str | Path, setting: str) -> Path:
    """``path`` as a new folder: missing or empty, and writable; nothing is created.

    Raises:
        ConfigError: ``path`` holds files, is a file, or cannot be written.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{setting} {path}: exists and is not an empty folder; give a new folder")
    return check_output_dir(path, setting)


def check_output_file(path: str | Path, setting: str) -> Path:
    """``path`` as a file that can be (over)written; its folder may still be missing.

    Raises:
        ConfigError: ``path`` is a folder, lies under a file, or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{setting} {path}: is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{setting} {path}: the file is read-only; give another file")
    _check_writable(path.parent, setting, path)
    return path


@contextmanager
def staged_dir(out: Path, tag: str) -> Iterator[Path]:
    """Write the new folder ``out`` whole or not at all.

    Yields a hidden sibling ``.<name>.<tag>-<pid>`` to fill. When the block ends without error
    it becomes ``out`` (which may exist only as an empty folder); on any error, Ctrl-C included,
    it is removed, so an interrupted command leaves nothing half-written under ``out``.

    Raises:
        ConfigError: ``out`` was filled by someone else meanwhile (the staged folder is removed).
    """
    tmp = out.with_name(f".{out.name}.{tag}-{os.getpid()}")
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            raise ConfigError(
                f"{out}: appeared while it was being written; give --out a new folder"
            )
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_writable(folder: Path, setting: str, shown: Path | None = None) -> None:
    shown = shown or folder
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{setting} {shown}: {existing} is a file, so no folder can be made under it; "
            "give another path"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".pivotseg-write-check-", dir=existing)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"{setting} {shown}: cannot write in {existing} ({reason}); give a path you can "
            "write to"
        ) from None
    os.rmdir(probe)
