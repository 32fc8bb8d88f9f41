"""``bench dg`` keeps honest books: it deletes nothing it did not write, row labels stay inside
``--out``, interrupted runs are resumed, finished runs are reused only under the same settings
and pivotseg version, unknown methods are refused before anything trains, and ``--quick`` is a
small run of the whole pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pivotseg.benchmarking.benchmark import BenchPlan, _overrides_for, _slug, run_benchmark
from pivotseg.cli.main import main
from pivotseg.config import DatasetSpec, config_to_dict, load_config
from pivotseg.engine import read_metrics
from pivotseg.errors import ConfigError
from pivotseg.tasks.dgss import evaluate, train
from pivotseg.tasks.dgss.train import spread
from tests.test_dgss import config_dict, make_folder_dataset


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base config (2 iterations, evaluated at the end) on tiny folder datasets."""
    root = tmp_path_factory.mktemp("bench_books")
    make_folder_dataset(root / "src", {"train": 4, "val": 2})
    make_folder_dataset(root / "tgt", {"val": 6}, seed=1, shift=25)
    cfg = config_dict(root, root / "unused")
    cfg["train"].update(iterations=2, eval_every=2, checkpoint_every=2, log_every=1)
    cfg["data"]["targets"] = [{"path": str(root / "tgt"), "format": "folder", "split": "val"}]
    cfg["data"]["targets"][0]["name"] = "tgt"
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def bench(base, out, *args) -> int:
    return main(["bench", "dg", "--config", str(base), "--out", str(out), *args])


def loss_iters(run) -> list[int]:
    return [r["iter"] for r in read_metrics(run) if "loss" in r]


def test_unknown_method_is_refused_before_anything_trains(base, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench(base, out, "--methods", "frozen", "reinn") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown method 'reinn'; did you mean rein? (known: frozen, full, lora, rein" in err
    assert not out.exists()
    plan = BenchPlan(config=base, methods=["x"], variants={"x": ("lorra", {})}, out_dir=out)
    with pytest.raises(ConfigError, match="unknown method 'lorra'; did you mean lora"):
        run_benchmark(plan)
    twins = {"a b": ("rein", {}), "a_b": ("rein", {})}
    plan = BenchPlan(config=base, methods=list(twins), variants=twins, out_dir=out)
    with pytest.raises(ConfigError, match="rows 'a b' and 'a_b' would share the folder a_b"):
        run_benchmark(plan)
    assert not out.exists()


@pytest.mark.parametrize("label", ["..", ".", "../x", "a/../../b", "/", ".hidden", "", "~"])
def test_a_row_label_is_one_folder_inside_out(tmp_path, label):
    name = _slug(label)
    assert name not in ("", ".", "..") and "/" not in name and not name.startswith(".")
    out = tmp_path / "out"
    assert (out / name / "seed0").resolve().parent.parent == out.resolve()


def test_a_dotdot_row_deletes_nothing_outside_out(base, tmp_path, capsys):
    row = tmp_path / "row.yaml"
    row.write_text(yaml.safe_dump({"model": config_to_dict(load_config(base))["model"]}))
    beside = tmp_path / "seed0"  # what `--row ..=...` used to reach as OUT/../seed0
    beside.mkdir()
    (beside / "notes.txt").write_text("not the benchmark's")
    out = tmp_path / "bench"
    assert bench(base, out, "--methods", "--row", f"..={row}", "--seeds", "0") == 0
    assert (beside / "notes.txt").read_text() == "not the benchmark's"
    assert (out / "run" / "seed0" / "bench.json").is_file()


def test_finished_runs_are_reused_only_under_the_same_settings(base, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--methods", "frozen", "--seeds", "0"]
    assert bench(base, out, *args) == 0
    run = out / "frozen" / "seed0"
    stamp = (run / "bench.json").stat().st_mtime_ns
    assert bench(base, out, *args) == 0  # the same settings: reused
    assert (run / "bench.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    # Other settings: refused before anything trains, the old run untouched.
    assert bench(base, out, "train.lr=0.002", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} was made with other settings (train.lr)" in err
    assert "--rerun" in err and (run / "bench.json").stat().st_mtime_ns == stamp
    # --rerun: the old run is moved aside, whole, and the run trained again.
    assert bench(base, out, "train.lr=0.002", "--rerun", *args) == 0
    aside = out / "frozen" / "seed0.old-1"
    assert (aside / "bench.json").stat().st_mtime_ns == stamp
    assert load_config(aside / "config.yaml").train.lr == 1e-3
    assert load_config(run / "config.yaml").train.lr == 0.002
    # Another pivotseg version made it: not reused either.
    env = json.loads((run / "env.json").read_text())
    (run / "env.json").write_text(json.dumps({**env, "pivotseg": "0.0.1"}))
    capsys.readouterr()
    assert bench(base, out, "train.lr=0.002", *args) == 2
    assert "pivotseg 0.0.1 (now " in capsys.readouterr().err


def test_interrupted_runs_are_resumed_or_restarted_never_deleted(base, tmp_path):
    out = tmp_path / "bench"
    plan = BenchPlan(config=base, methods=["frozen"], seeds=[0, 1], out_dir=out)
    runs = [out / "frozen" / f"seed{s}" for s in (0, 1)]
    for seed, run in zip((0, 1), runs):
        train(load_config(base, _overrides_for(plan, "frozen", seed, run)), stop_at=1)
        (run / "notes.txt").write_text("keep me")
    # seed 1 crashed before its first checkpoint: logged iteration 1, nothing to resume.
    shutil.rmtree(runs[1] / "checkpoints")
    run_benchmark(plan)
    resumed, restarted = runs
    assert (resumed / "checkpoints" / "iter_0000001").is_dir()  # the interrupted part is kept
    assert (resumed / "env_resume_1.json").is_file() and loss_iters(resumed) == [1, 2]
    assert json.loads((resumed / "bench.json").read_text())["resumed"] is True
    assert loss_iters(restarted) == [1, 2]  # started again: not 1, 1, 2
    assert json.loads((restarted / "bench.json").read_text())["resumed"] is False
    for run in runs:
        assert (run / "notes.txt").read_text() == "keep me"


def test_spread_takes_evenly_spaced_items():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(3)), 4) == [0, 1, 2]


def test_quick_is_one_short_seed_scored_on_a_few_frames(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "dg", "--config", str(base), "--quick", "--methods", "frozen"]) == 0
    assert "smoke run" in capsys.readouterr().out
    out = tmp_path / "runs" / "bench_dg_quick"
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("frozen", 0)]
    run = out / "frozen" / "seed0"
    cfg = load_config(run / "config.yaml")
    assert cfg.train.iterations == 10 and loss_iters(run)[-1] == 10
    assert json.loads((run / "bench.json").read_text())["eval_frames"] == 4
    # The logged score is that of 4 evenly spaced target frames (0, 1, 3, 4 of 6).
    tgt = DatasetSpec.from_string(f"{cfg.data.targets[0].path}:folder:val")
    few = tmp_path / "few"
    for kind in ("images", "labels"):
        (few / kind / "val").mkdir(parents=True)
        for i in (0, 1, 3, 4):
            shutil.copy(f"{tgt.path}/{kind}/val/{i:03d}.png", few / kind / "val")
    shutil.copy(f"{tgt.path}/classes.json", few)
    logged = [r["eval"] for r in read_metrics(run) if "eval" in r][-1]["targets"]["tgt"]
    record = evaluate(run, [DatasetSpec(path=str(few), split="val", name="few")], verbose=False)
    assert logged["miou"] == pytest.approx(record["targets"]["few"]["miou"], abs=1e-6)
    assert results["eval_frames"] == 4 and results["limit"] == 4
