"""One process at a time in a run folder: ``RUN/.pivotseg.lock``.

The lock is an ``flock`` on that file, so the operating system drops it when its process dies
however it dies; the file's JSON (pid, host, start time, command) only names the holder. A file
left behind by a killed process is therefore not a held lock: the next run takes it over and
says so. On a filesystem without ``flock`` support the recorded pid decides (a live process on
this host, or any process on another host, holds the folder).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from pivotseg.errors import ConfigError

LOCK_NAME = ".pivotseg.lock"


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The lock of run folder ``path`` (created if missing); :meth:`acquire`, then
    :meth:`release`. Usable as a context manager."""

    def __init__(self, path: str | Path):
        self.folder = Path(path)
        self.file = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.previous: dict | None = None  # the holder record of a dead process, if taken over

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunFolderBusy` naming the holder (pid, host, start).

        Prints a note on stderr when it takes over the lock file of a process that is gone.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            holder = _read_record(fd)
            if _held_by_other(fd, holder):
                os.close(fd)
                raise RunFolderBusy(f"{self.folder}: {describe(holder)}")
            # The file may have been released (unlinked) between our open and our lock: then
            # we hold a lock on a name nobody sees, and must start again on the new file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        if holder is not None and holder.get("pid") != os.getpid():
            self.previous = holder
            print(
                f"pivotseg: note: {self.folder}: took over the lock left by pid "
                f"{holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}), "
                "which is no longer running",
                file=sys.stderr,
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        return self

    def release(self, moved_to: str | Path | None = None) -> None:
        """Remove the lock file (in ``moved_to`` if the folder was renamed while held)."""
        if self._fd is None:
            return
        folder = Path(moved_to) if moved_to is not None else self.folder
        try:
            (folder / LOCK_NAME).unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: dict | None) -> str:
    """One line naming the process that holds a run folder, and what to do about it."""
    if not holder:
        who = "another process (it has not written its details yet)"
    else:
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')})"
        )
    return (
        f"in use by {who}; wait for it to end or set run_dir=<another folder> (if that process "
        f"is gone and the folder is on a filesystem without file locks, delete {LOCK_NAME})"
    )


def _read_record(fd: int) -> dict | None:
    data = os.pread(fd, 65536, 0)
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _held_by_other(fd: int, holder: dict | None) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        return _alive_elsewhere(holder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        return _alive_elsewhere(holder)  # ENOLCK and the like: the filesystem has no flock


def _alive_elsewhere(holder: dict | None) -> bool:
    pid = (holder or {}).get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True  # no way to tell from here; assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
