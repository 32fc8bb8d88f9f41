"""``pivotseg bench dg`` end to end on a tiny random backbone and tiny folder datasets."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pivotseg.cli.main import main
from pivotseg.tasks.dgss.benchmark import RunResult, format_tables, summarise
from tests.test_dgss import config_dict, make_folder_dataset


def _result(method, seed, tgt, val=50.0):
    return RunResult(
        method=method,
        seed=seed,
        run_dir="x",
        val_miou=val,
        targets={"a": tgt, "b": tgt + 10},
        mean_miou=tgt + 5,
        per_class={"a": [tgt, float("nan")], "b": [None, tgt]},
        trainable=1000,
        sec_per_iter=0.5,
        peak_memory_mb=100.0,
    )


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [_result("rein", 0, 40.0), _result("rein", 1, 44.0), _result("dpft", 0, 50.0)]
    s = summarise(runs)
    assert s["rein"]["targets"]["a"] == (42.0, pytest.approx(math.sqrt(8)))
    assert s["rein"]["mean"][0] == 47.0 and s["rein"]["per_seed_mean"] == [45.0, 49.0]
    assert s["dpft"]["targets"]["b"] == (60.0, 0.0)  # one seed: no spread
    assert math.isnan(s["rein"]["per_class"]["a"][1])  # absent class stays absent
    table = format_tables(s, {"a": ["road", "sky"]})
    assert "| rein | 50.0 ± 0.0 | 42.0 ± 2.8 | 52.0 ± 2.8 | 47.0 ± 2.8 |" in table
    assert "| rein | 42.0 | – |" in table


def test_bench_dg_runs_methods_and_seeds_and_reuses_finished_runs(tmp_path, capsys):
    data = tmp_path / "data"
    make_folder_dataset(data / "src", {"train": 4, "val": 2})
    make_folder_dataset(data / "tgt", {"val": 3}, seed=1, shift=25)
    cfg = config_dict(data, tmp_path / "unused")
    cfg["train"].update(iterations=2, eval_every=2, checkpoint_every=2, log_every=1)
    cfg["data"]["targets"] = []
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "bench"
    target = f"tgt={data / 'tgt'}:folder:val"
    args = ["bench", "dg", "--config", str(base), "--methods", "frozen", "rein"]
    args += ["--seeds", "0", "1", "--target", target, "--out", str(out)]
    args += ["model.method_args={}"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [
        ("frozen", 0),
        ("frozen", 1),
        ("rein", 0),
        ("rein", 1),
    ]
    summary = results["summary"]
    assert summary["rein"]["trainable"] > summary["frozen"]["trainable"]
    assert set(summary["frozen"]["targets"]) == {"tgt"}
    assert "| frozen |" in (out / "table.md").read_text()
    assert (out / "chart.png").stat().st_size > 0
    # Seeds differ; the same seed of another invocation is the finished run, not a new one.
    stamp = (out / "rein" / "seed1" / "bench.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "rein" / "seed1" / "bench.json").stat().st_mtime == stamp


def test_bench_dg_refuses_a_missing_target(tmp_path, capsys):
    code = main(["bench", "dg", "--target", f"night={tmp_path / 'nope'}:camvid"])
    assert code == 2
    assert "--target night" in capsys.readouterr().err
