"""bench/adapt.py's paired report, on hand-made rows (no model is run)."""

from __future__ import annotations

import json
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


def test_adaptations_are_paired_with_the_replay_only_control_and_spl_with_its_own_run():
    result = _result()
    for seed in range(3):
        base = next(r for r in result["rows"] if r["seed"] == seed and r["run"] == "dpft")
        result["rows"] += [
            _row("dpft", seed, "replay-only", base["miou"] + 3.0, 32.0),  # spl is +1.0, +1.1, +1.2
            _row("dpft", seed, "selftrain", base["miou"] + 4.0, 32.0),  # spl is +0.0, +0.1, +0.2
        ]
    pairs = {label: d for label, d, _ in paired_rows(result, "idd")}
    beyond = pairs["dpft + spl − dpft + replay-only"]
    assert [round(x, 6) for x in beyond.diffs] == [1.0, 1.1, 1.2]
    assert [round(x, 6) for x in pairs["dpft + spl − dpft + selftrain"].diffs] == [0.0, 0.1, 0.2]
    assert "dpft + selftrain − dpft + replay-only" in pairs
    # the control is not compared with spl twice, nor with itself
    assert "dpft + spl − dpft + replay-only" in pairs and not any(
        label.startswith("dpft + replay-only − dpft + replay-only") for label in pairs
    )
    assert "rein + tent − rein + replay-only" not in pairs  # rein has no control row
    lines = "\n".join(verdicts(result, "idd"))
    assert "dpft + spl − dpft + replay-only: +1.10" in lines


def test_proxy_pairs_variants_by_seed_against_source_only_and_the_reference():
    from bench.adapt_proxy import paired_lines, report

    rows = []
    for seed in range(3):
        rows += [
            dict(run="dpft", seed=seed, variant="source only", proxy=50.0 + seed, clean=57.0),
            dict(run="dpft", seed=seed, variant="spl", method="spl", proxy=51.0 + seed, clean=57.5),
            dict(
                run="dpft",
                seed=seed,
                variant="tent",
                method="tent",
                proxy=52.0 + 1.1 * seed,
                clean=58.0,
            ),  # fmt: skip
        ]
    result = {"command": "c", "adapt_frames": 50, "score_frames": 51, "steps": 40,
              "seeds": [0, 1, 2], "rows": rows}  # fmt: skip
    lines = {line[1]: line for line in paired_lines(result)}
    assert set(lines) == {"spl − source only", "tent − source only", "tent − spl"}
    assert lines["spl − source only"][2] == "+1.00 [+1.00, +1.00]"
    # tent − spl: +1.0, +1.1, +1.2 (sd 0.1): 1.1 ± 4.303 * 0.1 / sqrt(3)
    assert lines["tent − spl"][2] == "+1.10 [+0.85, +1.35]" and lines["tent − spl"][4] == 3
    assert "Paired by seed" in report(result) and "seeds 0, 1, 2" in report(result)


def test_stream_rows_are_compared_with_streams_and_offline_with_offline():
    result = _result()
    for seed in range(3):
        result["rows"] += [
            _row("dpft", seed, "spl-stream", 41.0, 33.0),
            _row("rein", seed, "tent-stream", 40.0, 33.0),
        ]
    labels = [label for label, _, _ in paired_rows(result, "idd")]
    assert "dpft + spl-stream − dpft source only" in labels
    assert "dpft + spl-stream − rein + tent-stream" in labels
    assert "dpft + spl − rein + tent" in labels
    assert "dpft + spl − rein + tent-stream" not in labels
    assert "dpft + spl-stream − rein + tent" not in labels
    lines = "\n".join(verdicts(result, "idd"))
    assert "dpft + spl-stream − dpft source only" in lines and "bar (≥ +3) not met" in lines


def test_pivot_similarity_scores_each_token_against_the_valid_pivots_only():
    import torch

    from bench.pivot_classifier import pivot_similarity

    class Tuning:  # the one method pivot_similarity reads: the last forward's pivot tokens
        def cached_pivot_tokens(self):
            # a 1x2 token grid of width 2: the first token along x, the second along y
            return {2: (torch.tensor([[[3.0, 0.0], [0.0, 0.5]]]), (1, 2), 0)}

    pivots = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    sim = pivot_similarity(Tuning(), (1, 2), {2: (pivots, torch.tensor([True, True, True]))})
    root_half = 2**-0.5
    expected = [[[1.0, 0.0]], [[0.0, 1.0]], [[root_half, root_half]]]  # cosine, not dot
    assert torch.allclose(sim[0], torch.tensor(expected), atol=1e-6)
    # an invalid pivot scores -1, so no token is given its class
    sim = pivot_similarity(Tuning(), (1, 2), {2: (pivots, torch.tensor([True, False, True]))})
    assert sim[0, 1].tolist() == [[-1.0, -1.0]] and sim[0].argmax(0).tolist() == [[0, 2]]


def test_replay_rows_pair_spl_with_selftrain_of_the_same_mode():
    from bench.adapt import ADAPTATIONS

    assert ADAPTATIONS["selftrain-replay"]["source_replay"] is True
    assert "source_replay" not in ADAPTATIONS["selftrain"]  # the default: source-free
    result = _result()
    for seed in range(3):
        result["rows"] += [
            _row("dpft", seed, "spl-replay", 45.0, 33.0),
            _row("dpft", seed, "selftrain-replay", 44.5 + 0.1 * seed, 33.0),
            _row("dpft", seed, "selftrain", 44.0, 33.0),
        ]
    pairs = {label: d for label, d, _ in paired_rows(result, "idd")}
    diffs = pairs["dpft + spl-replay − dpft + selftrain-replay"].diffs
    assert [round(x, 6) for x in diffs] == [0.5, 0.4, 0.3]
    assert "dpft + spl-replay − dpft + selftrain" not in pairs  # not across modes
    # the default (source-free) against the same with replay, on the same run
    assert [round(x, 6) for x in pairs["dpft + selftrain − dpft + selftrain-replay"].diffs] == [
        -0.5,
        -0.6,
        -0.7,
    ]


def test_self_training_streams_are_paired_with_the_source_under_their_teachers_augmentation():
    from bench.adapt import TTA

    result = _result()
    for seed in range(3):
        result["rows"] += [
            _row("dpft", seed, TTA, 41.5 + seed, 33.0),
            _row("dpft", seed, "selftrain-stream", 42.0 + seed, 33.0),
            _row("dpft", seed, "tent-stream", 41.0, 33.0),
        ]
    pairs = {label: d for label, d, _ in paired_rows(result, "idd")}
    assert [round(x, 6) for x in pairs["dpft + selftrain-stream − dpft source TTA"].diffs] == [
        0.5,
        0.5,
        0.5,
    ]
    # source only: 40, 41, 39 -> the augmentation's own share +1.5, +1.5, +4.5
    assert [round(x, 6) for x in pairs["dpft source TTA − dpft source only"].diffs] == [
        1.5,
        1.5,
        4.5,
    ]
    assert "dpft + tent-stream − dpft source TTA" not in pairs  # TENT predicts unaugmented
    assert not any(label.startswith("dpft source TTA − rein") for label in pairs)


def test_a_note_is_kept_with_the_rows_and_printed_under_the_intro(tmp_path, capsys):
    from bench.adapt import main

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(_result()))
    assert main(["--from-json", str(rows), "--note", "Frozen and full: trained in session 9."]) == 0
    assert json.loads(rows.read_text())["note"] == "Frozen and full: trained in session 9."
    assert main(["--from-json", str(rows)]) == 0  # a later render prints it without --note
    printed = capsys.readouterr().out
    assert printed.count("Frozen and full: trained in session 9.") == 2
