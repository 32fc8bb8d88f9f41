"""Short runs: ``eval.limit`` / ``--limit N`` scores a few evenly spaced frames per dataset in
training, ``pivotseg eval`` and ``bench dg`` (and every result says so); a warm-up longer
than the run is shortened with a note; ``data.val: null`` trains without a validation set."""

from __future__ import annotations

import pytest
import yaml

from pivotseg.benchmarking.benchmark import BenchPlan, _overrides_for, format_tables, summarise
from pivotseg.cli.main import main
from pivotseg.config import EvalConfig, config_from_dict, load_config
from pivotseg.engine import read_metrics
from pivotseg.errors import ConfigError
from pivotseg.tasks.dgss.evaluate import evaluate_datasets
from tests.test_dgss import config_dict, make_folder_dataset
from tests.test_eval_results import CLASSES, Frames, PixelsSayTheClass, strict_loads

MINIMAL = {"model": {"num_classes": 3}}
RIGHT = ([0, 0, 1, 1], [0, 0, 1, 1])
WRONG = ([0, 0, 1, 1], [1, 1, 1, 1])  # road taken for car


def test_eval_limit_is_checked():
    assert EvalConfig().limit is None
    assert config_from_dict(MINIMAL, ["eval.limit=5"]).eval.limit == 5
    assert config_from_dict(MINIMAL, ["eval.limit=null"]).eval.limit is None
    for bad, message in (("0", "must be at least 1"), ("-3", "must be at least 1")):
        with pytest.raises(ConfigError, match=f"eval.limit={bad}: {message}"):
            config_from_dict(MINIMAL, [f"eval.limit={bad}"])
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict(MINIMAL, ["eval.limit=some"])


def test_a_warm_up_longer_than_the_run_is_a_tenth_of_it_with_a_note(capsys):
    cfg = config_from_dict(MINIMAL, ["train.iterations=30", "train.warmup_iters=45"])
    assert cfg.train.warmup_iters == 3
    err = capsys.readouterr().err
    assert err == (
        "pivotseg: note: train.warmup_iters=45 is not below train.iterations=30; using "
        "train.warmup_iters=3 (a tenth of the run)\n"
    )
    assert config_from_dict(MINIMAL, ["train.iterations=30", "train.warmup_iters=29"])
    assert capsys.readouterr().err == ""  # a warm-up that fits is kept, silently
    assert (
        config_from_dict(MINIMAL, ["train.iterations=5", "train.warmup_iters=5"]).train.warmup_iters
        == 0
    )
    with pytest.raises(ConfigError, match="train.warmup_iters=-1: must be at least 0"):
        config_from_dict(MINIMAL, ["train.warmup_iters=-1"])


def test_limit_scores_evenly_spaced_frames_and_says_how_many():
    # Of six frames, a limit of 4 scores frames 0, 1, 3, 4: the wrong frames 2 and 5 are out.
    frames = [RIGHT, RIGHT, WRONG, RIGHT, RIGHT, WRONG]
    model = PixelsSayTheClass(len(CLASSES))
    cut = evaluate_datasets(model, {"t": Frames(frames)}, EvalConfig(limit=4))["targets"]["t"]
    assert (cut["frames"], cut["limit"], cut["miou"]) == (4, 4, 100.0)
    full = evaluate_datasets(model, {"t": Frames(frames)}, EvalConfig())["targets"]["t"]
    assert (full["frames"], full["limit"]) == (6, None)
    # road: 12 labelled, 8 predicted, all right -> 8/12; car: 12 labelled (all right), 16
    # predicted -> 12/16.
    assert full["miou"] == pytest.approx(100 * (8 / 12 + 12 / 16) / 2)
    many = evaluate_datasets(model, {"t": Frames(frames)}, EvalConfig(limit=50))["targets"]["t"]
    assert (many["frames"], many["limit"]) == (6, 50)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """``pivotseg train --limit 2`` of 10 iterations, warm-up 20 in the file, no val set."""
    root = tmp_path_factory.mktemp("limit")
    make_folder_dataset(root / "src", {"train": 4})
    make_folder_dataset(root / "tgt", {"val": 3}, seed=1, shift=25)
    data = config_dict(root, root / "run")
    data["train"].update(warmup_iters=20, eval_every=0, checkpoint_every=0, log_every=5)
    data["data"]["val"] = None  # documented: no validation set
    config = root / "short.yaml"
    config.write_text(yaml.safe_dump(data))
    return root, config


def test_short_training_run(short_run, capsys):
    root, config = short_run
    run = root / "run"
    assert main(["train", str(config), "train.iterations=10", "--limit", "2"]) == 0
    err = capsys.readouterr().err
    assert (
        "train.warmup_iters=20 is not below train.iterations=10; using train.warmup_iters=1" in err
    )
    saved = load_config(run / "config.yaml")
    assert saved.train.warmup_iters == 1 and saved.eval.limit == 2 and saved.data.val is None
    (record,) = [r["eval"] for r in read_metrics(run) if "eval" in r]
    assert "val" not in record
    logged = record["targets"]["tgt"]
    assert (logged["frames"], logged["limit"]) == (2, 2)

    # pivotseg eval keeps the run's limit, says so, and --limit all scores every frame.
    out = root / "eval.json"
    assert main(["eval", str(run), "--json", str(out), "--workers", "0"]) == 0
    table = capsys.readouterr().out
    assert "limited: at most 2 frames per dataset, evenly spaced" in table
    assert "per-class IoU on tgt" in table and "red" in table
    (entry,) = strict_loads(out.read_text())["datasets"]
    assert (entry["name"], entry["frames"], entry["limit"]) == ("tgt", 2, 2)
    assert entry["miou"] == pytest.approx(logged["miou"], abs=1e-9)
    assert list(entry["per_class"]) == ["red", "green", "blue"]
    every = root / "every.json"
    assert main(["eval", str(run), "--limit", "all", "--json", str(every), "--workers", "0"]) == 0
    assert "limited" not in capsys.readouterr().out
    (entry,) = strict_loads(every.read_text())["datasets"]
    assert (entry["frames"], entry["limit"]) == (3, None)
    assert main(["eval", str(run), "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "pivotseg: error: --limit 0: give a number of frames per dataset of at least 1, or all\n"
    )


def test_bench_limit_reaches_every_run(short_run, tmp_path, monkeypatch, capsys):
    import pivotseg.benchmarking.benchmark as benchmark

    _, config = short_run
    plans = []
    result = {"table": "", "chart": None}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda plan: plans.append(plan) or result)
    monkeypatch.chdir(tmp_path)

    def limit_of(*args):
        assert main(["bench", "dg", "--config", str(config), "--methods", "frozen", *args]) == 0
        return plans.pop().eval_frames

    assert limit_of("--limit", "3") == 3
    assert limit_of("--quick") == 4
    assert limit_of("--quick", "--limit", "2") == 2
    assert limit_of("--quick", "--limit", "all") is None
    assert limit_of() is None
    assert main(["bench", "dg", "--config", str(config), "--limit", "x"]) == 2
    assert "--limit x: give a number of frames" in capsys.readouterr().err
    plan = BenchPlan(config=config, methods=["frozen"], eval_frames=3, out_dir=tmp_path / "b")
    cfg = load_config(config, _overrides_for(plan, "frozen", 0, tmp_path / "b" / "frozen"))
    assert cfg.eval.limit == 3


def test_bench_table_says_it_was_limited():
    from pivotseg.benchmarking.benchmark import RunResult

    run = RunResult("dpft", 0, "x", 50.0, {"a": 40.0}, 40.0, {"a": [40.0]}, 10, 0.5, 100.0)
    summary = summarise([run], frames={"a": 4})
    assert "evenly spaced" not in format_tables(summary, {})
    summary["dpft"]["limit"] = 4
    assert (
        "Scored on at most 4 evenly spaced frames per dataset (--limit / eval.limit), not on the "
        "full targets."
    ) in format_tables(summary, {})
