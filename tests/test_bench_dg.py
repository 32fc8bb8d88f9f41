"""``pivotseg bench dg`` end to end on a tiny random backbone and tiny folder datasets."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from pivotseg.benchmarking.benchmark import RunResult, format_tables, summarise
from pivotseg.cli.main import main
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


def _sized(method, seed, big, tiny, val=50.0):
    return RunResult(
        method=method,
        seed=seed,
        run_dir="x",
        val_miou=val,
        targets={"big": big, "tiny": tiny, "lost": 70.0},
        mean_miou=float("nan"),  # the evaluation's mean of all targets is not the headline
        per_class={"big": [big], "tiny": [tiny], "lost": [70.0]},
        trainable=1000,
        sec_per_iter=0.5,
        peak_memory_mb=100.0,
    )


def test_headline_mean_covers_only_targets_of_100_frames_or_more():
    # "tiny" (1 frame) swings wildly and "lost" has no known count: neither enters the mean.
    runs = [
        _sized("dpft", 0, 40.0, 99.0, val=41.0),
        _sized("dpft", 1, 43.0, 0.0, val=42.0),
        _sized("dpft", 2, 41.0, 50.0, val=40.0),
        _sized("rein", 0, 39.0, 10.0, val=40.0),
        _sized("rein", 1, 40.0, 10.0, val=40.0),
        _sized("rein", 2, 41.0, 10.0, val=40.0),
    ]
    s = summarise(runs, frames={"big": 171, "tiny": 1})
    assert s["dpft"]["per_seed_mean"] == [40.0, 43.0, 41.0]
    assert s["dpft"]["headline_targets"] == ["big"]
    assert s["dpft"]["smoke_targets"] == ["tiny", "lost"]
    table = format_tables(s, {})
    header = table.splitlines()[0]
    assert "| big (171 frames) | tiny (1 frame, smoke check) |" in header
    assert "| lost (frames unknown, smoke check) | mean of targets ≥ 100 frames |" in header
    assert "Smoke checks, outside the mean of targets (under 100 frames): tiny (1 frame)" in table
    # DPFT against rein, seed by seed: diffs 1, 3, 0 -> mean 1.33, sd 1.528, t(0.975, 2) 4.303,
    # half-width 4.303 * 1.528 / sqrt 3 = 3.79: the interval [-2.5, +5.1] contains 0.
    assert (
        "| dpft − rein | mean of targets ≥ 100 frames | 0: +1.0, 1: +3.0, 2: +0.0 | +1.3 | "
        "[-2.5, +5.1] | the interval contains 0: no reliable difference |"
    ) in table
    # source val: diffs 1, 2, 0 -> mean 1, sd 1, half 4.303 / sqrt 3 = 2.48.
    assert "| dpft − rein | source val | 0: +1.0, 1: +2.0, 2: +0.0 | +1.0 | [-1.5, +3.5] |" in table


def test_no_target_large_enough_means_no_headline_and_says_so():
    s = summarise([_sized("rein", 0, 40.0, 50.0)], frames={"big": 20, "tiny": 1})
    assert s["rein"]["headline_targets"] == [] and math.isnan(s["rein"]["mean"][0])
    table = format_tables(s, {})
    assert "No target has 100 frames or more, so there is no headline mean" in table
    assert "Paired differences" not in table  # no dpft row: nothing to pair


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
    # Frames are counted from the target's dataset: 3 frames make it a smoke check.
    assert summary["frozen"]["frames"] == {"tgt": 3}
    assert summary["frozen"]["smoke_targets"] == ["tgt"]
    table = (out / "table.md").read_text()
    assert "| frozen |" in table and "tgt (3 frames, smoke check)" in table
    assert (out / "chart.png").stat().st_size > 0
    # Seeds differ; the same seed of another invocation is the finished run, not a new one.
    stamp = (out / "rein" / "seed1" / "bench.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "rein" / "seed1" / "bench.json").stat().st_mtime == stamp


def test_bench_dg_refuses_a_missing_target(tmp_path, capsys):
    code = main(["bench", "dg", "--target", f"night={tmp_path / 'nope'}:camvid"])
    assert code == 2
    assert "--target night" in capsys.readouterr().err


# ----- rows with a model of their own ------------------------------------------------------------
TINY_RN = dict(layers=[1, 1, 1, 1], width=8, heads=2, output_dim=16, image_size=64, attnpool=False)
RN_ROW = {
    "model": {
        "num_classes": 3,
        "backbone": "clip_resnet",
        "backbone_config": {**TINY_RN, "output_stride": 16},
        "out_indices": [0, 3],
        "method": "frozen",
        "head": "deeplabv3plus",
        "head_args": {
            "aspp_rates": [1, 2, 3],
            "channels": 16,
            "low_level_channels": 8,
            "dropout": 1e-5,  # JSON would write 1e-05, which YAML 1.1 reads as a string
        },
    }
}


def _base(tmp_path, iterations=2):
    data = tmp_path / "data"
    make_folder_dataset(data / "src", {"train": 4, "val": 2})
    make_folder_dataset(data / "tgt", {"val": 2}, seed=1, shift=25)
    cfg = config_dict(data, tmp_path / "unused")
    cfg["train"].update(iterations=iterations, eval_every=2, checkpoint_every=2, log_every=1)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    return base, cfg


def test_row_with_its_own_model_trains_it_on_the_base_data_and_budget(tmp_path):
    base, cfg = _base(tmp_path)
    row = tmp_path / "rn_row.yaml"
    row.write_text(yaml.safe_dump(RN_ROW))
    out = tmp_path / "bench"
    args = ["bench", "dg", "--config", str(base), "--methods", "--row", f"rn 50={row}"]
    assert main(args + ["--seeds", "0", "--out", str(out), "model.head_args.channels=8"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("rn 50", 0)]
    assert results["row_models"]["rn 50"]["backbone"] == "clip_resnet"
    run = yaml.safe_load((out / "rn_50" / "seed0" / "config.yaml").read_text())
    # The row's model as written (the model.* override is for base rows) ...
    assert run["model"]["backbone"] == "clip_resnet" and run["model"]["head"] == "deeplabv3plus"
    assert run["model"]["head_args"]["channels"] == 16
    assert run["model"]["backbone_config"]["width"] == 8
    # ... on the base's data, budget and targets.
    assert run["data"]["source"]["path"] == cfg["data"]["source"]["path"]
    assert run["data"]["crop_size"] == [32, 32] and run["train"]["iterations"] == 2
    assert list(results["summary"]["rn 50"]["targets"]) == ["tgt"]
    # The trained model is that ResNet: its checkpoint holds a DeepLabv3+ head.
    seg = json.loads(
        (out / "rn_50" / "seed0" / "checkpoints" / "last" / "segmenter.json").read_text()
    )
    assert seg["backbone"] == "clip_resnet" and seg["head"] == "deeplabv3plus"


def test_base_rows_keep_the_base_model_beside_a_model_row(tmp_path):
    from pivotseg.benchmarking.benchmark import BenchPlan, _overrides_for, load_row_model
    from pivotseg.config import load_config

    base, _ = _base(tmp_path)
    row = tmp_path / "rn_row.yaml"
    row.write_text(yaml.safe_dump(RN_ROW))
    plan = BenchPlan(
        config=base,
        methods=["rein", "rn"],
        variants={"rein": ("rein", {"scale": 1e-5, "linear": True})},
        models={"rn": load_row_model(row, "rn")},
        overrides=["model.method_args={}", "train.lr=0.5"],
    )
    rein = load_config(base, _overrides_for(plan, "rein", 1, tmp_path / "a"))
    rn = load_config(base, _overrides_for(plan, "rn", 1, tmp_path / "b"))
    assert rein.model.method_args == {"scale": 1e-5, "linear": True}
    assert rn.model.head_args["dropout"] == 1e-5
    assert (rein.model.backbone, rein.model.method, rein.model.head) == ("dinov2", "rein", "fpn")
    assert (rn.model.backbone, rn.model.method, rn.model.head) == (
        "clip_resnet",
        "frozen",
        "deeplabv3plus",
    )
    assert rein.train == rn.train and rn.train.lr == 0.5 and rn.seed == rein.seed == 1
    assert rein.data == rn.data


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("data: {}\n", "needs a model: section"),
        ("- 1\n", "needs a model: section"),
        ("model: {num_classes: 3}\ntrain: {lr: 1}\n", "only model: is read, found train"),
        ("model: {num_classes: 3, backbon: dinov2}\n", "did you mean model.backbone?"),
        ("model: [1\n", "not valid YAML"),
    ],
)
def test_bad_row_files_are_one_line_errors(tmp_path, capsys, content, message):
    row = tmp_path / "row.yaml"
    if content is not None:
        row.write_text(content)
    code = main(["bench", "dg", "--methods", "frozen", "--row", f"x={row}", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and f"--row x={row}" in err and err.count("\n") == 1


def test_bad_row_arguments(tmp_path, capsys):
    row = tmp_path / "row.yaml"
    row.write_text(yaml.safe_dump(RN_ROW))
    for args, message in [
        (["--row", str(row)], "write LABEL=MODEL_YAML"),
        (["--methods", "frozen", "--row", f"frozen={row}"], "already a row"),
        (["--methods"], "no rows"),
    ]:
        assert main(["bench", "dg", *args, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
