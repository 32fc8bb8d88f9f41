"""Model work of the web app, one job at a time on one worker thread, with its progress.

One worker because the models are not safe to share between threads (a SAM predictor keeps the
image it encoded last) and two concurrent forwards on a CPU only slow each other down. The
page polls a job's :meth:`Job.snapshot` for its step, its place in the queue and its results.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pivotseg.errors import PivotsegError

log = logging.getLogger("pivotseg.serve")

QUEUED, RUNNING, DONE, ERROR = "queued", "running", "done", "error"


@dataclass
class Job:
    """One piece of model work: its state, the step it is at, its result and the files it made.

    ``files`` hold the PNGs the result refers to (served under ``/api/jobs/<id>/files/``).
    """

    id: str
    kind: str
    seq: int
    state: str = QUEUED
    step: str = "waiting for the model"
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None

    def progress(self, step: str) -> None:
        """Show ``step`` on the page (called by the work as it goes)."""
        self.step = step

    def add_file(self, name: str, png: bytes) -> str:
        """Keep ``png`` with the job and return its URL."""
        self.files[name] = png
        return f"/api/jobs/{self.id}/files/{name}"


class JobQueue:
    """Runs submitted work in order on one thread; keeps the last ``keep`` finished jobs."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pivotseg-serve")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def submit(self, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue ``work(job) -> result``; a :class:`PivotsegError` it raises becomes the job's
        message, any other exception a short one (logged with its traceback)."""
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, seq=next(self._seq))
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        self._executor.submit(self._run, job, work)
        return job

    def call(self, work: Callable[[], Any]) -> Future:
        """Run ``work()`` on the model thread, after the jobs already queued (a short step the
        page waits for, like decoding a click against an encoded image)."""
        return self._executor.submit(work)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def snapshot(self, job: Job) -> dict[str, Any]:
        """What the page shows: state, step, jobs ahead in the queue, result or error."""
        with self._lock:
            ahead = sum(
                1 for j in self._jobs.values() if j.seq < job.seq and j.state in (QUEUED, RUNNING)
            )
        out: dict[str, Any] = {"id": job.id, "kind": job.kind, "state": job.state}
        if job.state == QUEUED:
            out["step"] = f"queued ({ahead} ahead)" if ahead else "starting"
        else:
            out["step"] = job.step
        if job.started is not None:
            out["seconds"] = round((job.finished or time.monotonic()) - job.started, 2)
        if job.state == DONE:
            out["result"] = job.result
        if job.state == ERROR:
            out["error"] = job.error
        return out

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        job.state, job.started = RUNNING, time.monotonic()
        try:
            job.result = work(job) or {}
            job.state = DONE
        except PivotsegError as err:
            job.error, job.state = str(err), ERROR
        except MemoryError:
            job.error, job.state = "out of memory; try a smaller image", ERROR
        except Exception as err:  # the server keeps serving whatever one job does
            log.exception("job %s (%s) failed", job.id, job.kind)
            job.error, job.state = f"internal error ({type(err).__name__}: {err})", ERROR
        finally:
            job.finished = time.monotonic()

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state in (DONE, ERROR)]
        for job_id in finished[: max(0, len(self._jobs) - self.keep)]:
            del self._jobs[job_id]
