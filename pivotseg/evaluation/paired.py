"""Paired comparison of two benchmark rows over seeds: differences, mean, Student-t interval.

Two rows trained with the same seed share the data order, the augmentations and the head's
initial weights (:func:`pivotseg.segmenter.build_segmenter`), so the per-seed difference
removes that shared noise. With n seeds the interval is ``mean ± t(1 - α/2, n - 1) · sd / √n``
(sd: sample standard deviation of the differences); with 3 seeds t is 4.30, so only a
difference that is large against its spread is called one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from scipy.stats import t as student_t


@dataclass(frozen=True)
class PairedDifference:
    """``a − b`` per seed and its summary.

    Attributes:
        seeds: the seeds both rows have a finite value for, in ``a``'s order.
        diffs: ``a[seed] − b[seed]`` for those seeds.
        mean: mean difference (NaN without seeds).
        sd: sample standard deviation of the differences (NaN below two seeds).
        low, high: the ``level`` Student-t interval of the mean (NaN below two seeds).
        level: the interval's coverage.
    """

    seeds: list[int]
    diffs: list[float]
    mean: float
    sd: float
    low: float
    high: float
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def contains_zero(self) -> bool:
        """True when the interval does not exclude 0 (or there is no interval)."""
        return self.n < 2 or not (self.low > 0 or self.high < 0)

    def summary(self) -> str:
        """``+1.23 [+0.45, +2.01]`` (mean and interval), ``+1.23 (1 seed)``, or ``–``."""
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"

    def verdict(self, a: str, b: str) -> str:
        """What the comparison allows one to say, in words."""
        if self.n == 0:
            return f"no seed with a value for both {a} and {b}: no comparison"
        if self.n == 1:
            return "one seed only: no interval, no conclusion (run 3 seeds or more)"
        if self.contains_zero:
            return "the interval contains 0: no reliable difference"
        side = "above" if self.mean > 0 else "below"
        return f"{a} {side} {b}: the interval excludes 0"


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
) -> PairedDifference:
    """Compare row ``a`` with row ``b``, each given as ``{seed: value}``.

    Seeds missing from either row, or with a NaN/None value in either, are left out.
    """
    seeds = [s for s in a if s in b and _finite(a[s]) and _finite(b[s])]
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    nan = float("nan")
    if not diffs:
        return PairedDifference(seeds, diffs, nan, nan, nan, nan, level)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(seeds, diffs, mean, nan, nan, nan, level)
    sd = statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + level / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return PairedDifference(seeds, diffs, mean, sd, mean - half, mean + half, level)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
