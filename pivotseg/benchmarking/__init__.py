"""Benchmarks of pivotseg itself: what ``pivotseg bench dg`` and the ``bench/`` scripts share.

- :mod:`~pivotseg.benchmarking.benchmark`: ``pivotseg bench dg``, every tuning method under
  one budget, over seeds and unseen targets (child processes, tables, chart).
- :mod:`~pivotseg.benchmarking.bench_runs`: when a run found again is reused, resumed, started
  again or set aside.
- :mod:`~pivotseg.benchmarking.report`: a script's section of docs/benchmarks.md (and README's
  generated results), the machine line.
- :mod:`~pivotseg.benchmarking.cases`: one benchmark case per fresh process, its memory.

The ``bench/`` scripts run from a source checkout (``python bench/X.py`` in the repository
root) and import only ``pivotseg``, installed editable (``pip install -e .``).
"""

from __future__ import annotations

from pathlib import Path


def check_checkout(script: str | Path) -> Path:
    """The checkout holding the bench script ``script``, once sure ``pivotseg`` comes from it.

    One venv may serve several worktrees; a script must neither time nor document another
    tree's code.

    Raises:
        SystemExit: ``pivotseg`` is imported from another folder (one line, with the fix).
    """
    from pivotseg.paths import REPO_ROOT

    root = Path(script).resolve().parent.parent
    if REPO_ROOT.resolve() != root:
        raise SystemExit(
            f"{Path(script).name}: this python imports pivotseg from {REPO_ROOT}, not from "
            f"{root}; run it with PYTHONPATH={root} or pip install -e {root}"
        )
    return root
