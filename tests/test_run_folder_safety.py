"""Run folders are protected: one process at a time (a lock naming its holder, taken over from a
dead one), a new run never mixes with files it finds, ``--overwrite`` replaces only the files of
an earlier run, and a run that fails during set-up leaves no half-made folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from pivotseg.cli.main import main
from pivotseg.config import load_config
from pivotseg.engine import NonFiniteLoss, read_metrics
from pivotseg.engine.run_lock import LOCK_NAME, RunFolderBusy, RunLock
from pivotseg.errors import ConfigError, DataError
from pivotseg.paths import REPO_ROOT
from pivotseg.tasks.dgss import train
from tests.test_dgss import config_dict, make_folder_dataset


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    make_folder_dataset(root / "src", {"train": 4, "val": 2})
    make_folder_dataset(root / "tgt", {"val": 2}, seed=1, shift=25)
    data = config_dict(root, root / "unused")
    del data["run_dir"]
    data["train"].update(iterations=2, eval_every=0, checkpoint_every=0)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def loss_iters(run) -> list[int]:
    return [r["iter"] for r in read_metrics(run) if "loss" in r]


def test_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(config, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "pivotseg", "train", str(config), f"run_dir={run}"]
    command += ["train.iterations=100000", "train.log_every=1"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and loss_iters(run)):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        # A second run in the same folder while the first one trains.
        assert main(["train", str(config), f"run_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run}: in use by pid {first.pid}" in err
        assert f"on {socket.gethostname()} since " in err
    finally:
        first.kill()  # SIGKILL: no clean-up, its lock file stays behind
        first.wait()
    iters = loss_iters(run)
    assert iters == list(range(1, len(iters) + 1))  # the first run's records only
    assert (run / LOCK_NAME).is_file()
    # The lock of the dead process is taken over, with a note naming it.
    assert main(["train", str(config), f"run_dir={run}", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock left by pid {first.pid}" in err
    assert loss_iters(run) == [1, 2]
    assert not (run / LOCK_NAME).exists()


def test_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run").acquire().release()


def test_new_run_refuses_the_folder_of_a_run_that_crashed_before_its_first_checkpoint(
    config, tmp_path
):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss):  # iteration 1 is logged, iteration 2 is NaN
        train(load_config(config, [f"run_dir={run}", "train.lr=.inf"]))
    crashed = read_metrics(run)
    assert [r["iter"] for r in crashed] == [1] and not (run / "checkpoints" / "last").exists()
    with pytest.raises(ConfigError, match="not empty .* pass --overwrite"):
        train(load_config(config, [f"run_dir={run}"]))
    assert read_metrics(run) == crashed  # not 1, 1, 2
    train(load_config(config, [f"run_dir={run}"]), overwrite=True)
    assert loss_iters(run) == [1, 2]


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config), f"run_dir={run}"]) == 0
    (run / "notes.txt").write_text("lr sweep, do not delete")
    assert main(["train", str(config), f"run_dir={run}", "train.iterations=3"]) == 2
    err = capsys.readouterr().err
    assert f"holds a run already; continue it with --resume {run}" in err and "--overwrite" in err
    assert loss_iters(run) == [1, 2]
    assert main(["train", str(config), f"run_dir={run}", "train.iterations=3", "--overwrite"]) == 0
    assert (
        "--overwrite removed the earlier run's checkpoints, config.yaml" in capsys.readouterr().err
    )
    assert loss_iters(run) == [1, 2, 3]
    assert load_config(run / "config.yaml").train.iterations == 3
    assert (run / "notes.txt").read_text() == "lr sweep, do not delete"
    # A folder of someone else's files is not a run folder: refused too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["train", str(config), f"run_dir={other}"]) == 2
    assert "not empty (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "give one" in capsys.readouterr().err


def test_failed_setup_leaves_no_half_made_run_folder(config, tmp_path):
    run = tmp_path / "new" / "run"
    # The trainer refuses this batch split after the old code had written the folder.
    with pytest.raises(ConfigError, match="per_device_batch_size=3"):
        train(load_config(config, [f"run_dir={run}", "train.per_device_batch_size=3"]))
    assert not (tmp_path / "new").exists()
    # A folder that held files keeps them, and only them.
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="per_device_batch_size=3"):
        train(
            load_config(config, [f"run_dir={run}", "train.per_device_batch_size=3"]),
            overwrite=True,
        )
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_failed_start_with_overwrite_keeps_the_earlier_run(config, tmp_path):
    run = tmp_path / "run"
    train(load_config(config, [f"run_dir={run}"]))
    before = read_metrics(run)
    missing = f"data.targets=[{{path: {tmp_path / 'nowhere'}, format: folder}}]"
    with pytest.raises(DataError, match="nowhere"):
        train(load_config(config, [f"run_dir={run}", missing]), overwrite=True)
    assert read_metrics(run) == before and (run / "checkpoints" / "last").is_dir()
    assert not (run / LOCK_NAME).exists()
