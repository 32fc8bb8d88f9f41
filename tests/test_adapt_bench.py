"""bench/adapt.py's paired report, on hand-made rows (no model is run)."""

from __future__ import annotations

import math

from bench.adapt import paired_rows, report, verdicts


def _row(run, seed, adaptation, miou, val):
    return dict(target="idd", run=run, seed=seed, adaptation=adaptation, miou=miou, source_val=val)


def _result():
    rows = []
    for seed, (dpft, rein) in enumerate([(40.0, 40.5), (41.0, 40.0), (39.0, 40.2)]):
        rows += [
            _row("dpft", seed, "source only", dpft, 33.0),
            _row("dpft", seed, "spl", dpft + 4.0 + 0.1 * seed, 32.0),  # +4.0, +4.1, +4.2
            _row("rein", seed, "source only", rein, 33.0),
            _row("rein", seed, "tent", rein - 2.0 + 1.5 * (seed - 1), 33.5),  # -3.5, -2, -0.5
        ]
    return {
        "rows": rows,
        "frames": {"idd": {"adapt": 109, "score": 95}},
        "targets": ["idd"],
        "steps": 100,
        "val_every": 3,
        "command": "python bench/adapt.py",
    }


def test_paired_differences_by_seed():
    pairs = {label: (d, v) for label, d, v in paired_rows(_result(), "idd")}
    spl, spl_val = pairs["dpft + spl − dpft source only"]
    assert [round(x, 6) for x in spl.diffs] == [4.0, 4.1, 4.2] and math.isclose(spl.mean, 4.1)
    # t(0.975, 2) = 4.303, sd = 0.1: half-width 4.303 * 0.1 / sqrt(3)
    assert math.isclose(spl.high - spl.mean, 4.303 * 0.1 / math.sqrt(3), rel_tol=1e-3)
    assert spl_val.diffs == [-1.0, -1.0, -1.0]
    tent, _ = pairs["rein + tent − rein source only"]
    assert [round(x, 6) for x in tent.diffs] == [-3.5, -2.0, -0.5] and tent.contains_zero
    versus, _ = pairs["dpft + spl − rein + tent"]
    # spl: 44.0, 45.1, 43.2; rein + tent: 37.0, 38.0, 39.7
    assert [round(x, 6) for x in versus.diffs] == [7.0, 7.1, 3.5]


def test_the_bar_is_said_in_words():
    lines = "\n".join(verdicts(_result(), "idd"))
    assert "dpft + spl − dpft source only: +4.10" in lines and "bar (≥ +3) met" in lines
    assert "(bar: within 2 mIoU: met)" in lines
    assert "rein + tent − rein source only" in lines and "the interval contains 0" in lines
    text = report(_result())
    assert "### idd" in text and "| dpft | 0 | spl | 44.00 | 32.00 |" in text


def test_a_missed_bar_is_said_too():
    result = _result()
    for r in result["rows"]:
        if r["adaptation"] == "spl":
            r["miou"] -= 2.0  # +2.0, +2.1, +2.2: above 0, below the bar
    lines = "\n".join(verdicts(result, "idd"))
    assert "bar (≥ +3) not met" in lines and "dpft + spl above dpft source only" in lines
