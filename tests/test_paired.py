"""Paired differences over seeds against values computed by hand."""

from __future__ import annotations

import math

import pytest

from pivotseg.evaluation.paired import paired_difference


def test_issue_example_dpft_minus_full():
    # Per-seed mean target mIoU, seeds 0-2: dpft 39.3/37.0/39.5, full 38.9/38.3/36.7.
    d = paired_difference({0: 39.3, 1: 37.0, 2: 39.5}, {0: 38.9, 1: 38.3, 2: 36.7})
    assert d.seeds == [0, 1, 2]
    assert d.diffs == pytest.approx([0.4, -1.3, 2.8])
    # By hand: mean 1.9 / 3; squared deviations 0.05444 + 3.73778 + 4.69444 = 8.48667,
    # sd = sqrt(8.48667 / 2) = 2.05993; t(0.975, 2) = 4.30265; half = 4.30265 * 2.05993 / sqrt 3.
    assert d.mean == pytest.approx(0.63333, abs=1e-5)
    assert d.sd == pytest.approx(2.05993, abs=1e-5)
    assert d.low == pytest.approx(0.63333 - 5.11716, abs=1e-4)
    assert d.high == pytest.approx(0.63333 + 5.11716, abs=1e-4)
    assert d.contains_zero
    assert "contains 0" in d.verdict("dpft", "full")


def test_a_consistent_difference_excludes_zero_and_says_which_side():
    # diffs 2, 3, 4: mean 3, sd 1, half = 4.30265 / sqrt 3 = 2.48414.
    d = paired_difference({0: 12.0, 1: 13.0, 2: 14.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (d.low, d.high) == (pytest.approx(0.51586, abs=1e-5), pytest.approx(5.48414, abs=1e-5))
    assert not d.contains_zero
    assert d.verdict("dpft", "rein") == "dpft above rein: the interval excludes 0"
    below = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 3.0, 1: 5.0, 2: 7.0})
    assert below.verdict("dpft", "rein") == "dpft below rein: the interval excludes 0"


def test_seeds_are_paired_by_value_and_missing_or_nan_ones_left_out():
    # Seed 1 is missing from b, seed 3's value is NaN: only seeds 2 and 0 remain, in a's order.
    a = {2: 5.0, 1: 9.0, 0: 4.0, 3: float("nan")}
    b = {0: 1.0, 2: 2.0, 3: 1.0}
    d = paired_difference(a, b)
    assert d.seeds == [2, 0] and d.diffs == [3.0, 3.0]
    assert d.sd == 0.0 and d.low == d.high == 3.0  # identical differences: a zero-width interval
    # 90 % interval: t(0.95, 1) = 6.31375; diffs 1, 3 -> mean 2, sd sqrt 2, half 6.31375.
    d90 = paired_difference({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0}, level=0.90)
    assert d90.high - d90.mean == pytest.approx(6.31375, abs=1e-5)


def test_fewer_than_two_seeds_give_no_interval():
    one = paired_difference({0: 3.0}, {0: 1.0})
    assert one.mean == 2.0 and math.isnan(one.low) and one.contains_zero
    assert "one seed only" in one.verdict("dpft", "rein")
    none = paired_difference({0: 3.0}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean)
    assert "no seed" in none.verdict("dpft", "rein")


def test_summary_says_mean_and_interval_or_why_not():
    assert paired_difference({}, {}).summary() == "–"
    assert paired_difference({0: 2.0}, {0: 1.5}).summary() == "+0.50 (1 seed)"
    # diffs 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732 = 2.48
    three = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert three.summary() == "+2.00 [-0.48, +4.48]"
