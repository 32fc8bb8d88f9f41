"""Process memory as Linux reports it, for the benchmarks that measure peak memory per case.

tracemalloc sees only Python allocations (not torch's or ONNX Runtime's), so the benchmarks read
``/proc/self/status`` and reset the peak through ``/proc/self/clear_refs`` between phases.
"""

from __future__ import annotations

from pathlib import Path


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
