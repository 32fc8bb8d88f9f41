"""bench/tta.py: its report pairs each augmented row with single scale by seed and gives the
time as a ratio; run end to end on a tiny run with the run's own targets."""

from __future__ import annotations

import json
import math

import pytest

from bench.tta import main, parse_variant, report
from pivotseg.config import config_from_dict, save_config
from tests.test_dgss import make_folder_dataset
from tests.test_export_onnx import tiny_segmenter


def _row(seed, variant, val, tgt, seconds):
    return {"run": "dpft", "seed": seed, "variant": variant, "s_per_frame": seconds,
            "miou": {"source val": val, "tgt": tgt}}  # fmt: skip


def test_report_pairs_by_seed_and_gives_the_time_ratio():
    rows = []
    for seed, base in enumerate([50.0, 52.0, 48.0]):
        rows += [
            _row(seed, "single scale", base, base - 10, 0.2),
            _row(seed, "ms", base + 1.0, base - 10 + 0.5 * (seed + 1), 1.2 + 0.2 * seed),
        ]
    text = report({"rows": rows, "limit": 50})
    half = 4.303 * 0.5 / math.sqrt(3)  # t(0.975, 2) * sd([0.5, 1, 1.5]) / sqrt(3)
    line = next(x for x in text.splitlines() if x.startswith("| dpft ms − single scale"))
    assert "+1.00 [+1.00, +1.00]" in line
    assert f"+1.00 [{1 - half:+.2f}, {1 + half:+.2f}]" in line
    assert line.endswith("| 7.0x |")  # mean of 6, 7, 8


def test_variants_are_parsed_or_refused():
    assert parse_variant("ms:0.75,1,1.25:flip") == ("ms", [0.75, 1.0, 1.25], True)
    assert parse_variant("two:1,2") == ("two", [1.0, 2.0], False)
    with pytest.raises(SystemExit, match="NAME:S1,S2"):
        parse_variant("ms:1:mirror")


def test_runs_end_to_end_and_resumes(tmp_path):
    model = tiny_segmenter("rein").eval()
    data = make_folder_dataset(tmp_path / "data", {"train": 1, "val": 2}, seed=1)
    run = tmp_path / "run0"
    model.save(run / "checkpoints" / "last")
    cfg = config_from_dict({
        "model": model.config.to_dict(),
        "data": {"source": {"path": str(data), "format": "folder", "split": "train"},
                 "val": {"path": str(data), "format": "folder", "split": "val"},
                 "targets": [{"path": str(data), "format": "folder", "split": "val",
                              "name": "tgt"}]},
        "run_dir": str(run),
    })  # fmt: skip
    save_config(cfg, run / "config.yaml")
    out = tmp_path / "rows.json"
    argv = ["--run", f"tiny={tmp_path}/run{{seed}}", "--targets", "tgt", "--limit", "1",
            "--variant", "flip:1:flip", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["single scale", "flip"]
    assert set(rows[0]["miou"]) == {"source val", "tgt"}
    assert main(argv) == 0  # resumed: nothing added
    assert len(json.loads(out.read_text())["rows"]) == 2

    # a run without targets is scored on another config's (every run on the same datasets)
    bare = tmp_path / "bare0"
    model.save(bare / "checkpoints" / "last")
    cfg.data.targets, cfg.run_dir = [], str(bare)
    save_config(cfg, bare / "config.yaml")
    argv = ["--run", f"bare={tmp_path}/bare{{seed}}", "--targets", "tgt", "--limit", "1",
            "--datasets-from", str(run / "config.yaml"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [set(r["miou"]) for r in rows[2:]] == [{"source val", "tgt"}] * 2
    assert rows[2]["miou"] == rows[0]["miou"]  # the same weights on the same frames
