"""Benchmark cases each in a fresh process: their JSON result, and their memory as Linux reports it.

A fresh process per case keeps one case's allocations and thread pools out of the next one's
figures. tracemalloc sees only Python allocations (not torch's or ONNX Runtime's), so the cases
read ``/proc/self/status`` and reset the peak through ``/proc/self/clear_refs`` between phases.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def run_case_process(cmd: list[str], timeout_s: int, cwd: Path) -> dict:
    """Run one case; the last JSON line it printed, or ``{"skipped": reason}``."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {timeout_s} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"failed: {tail[:160]}"}
    return json.loads(lines[-1])


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
