"""What ``pivotseg train`` prints: the command that resumes a ``--stop-at`` run, and under
torchrun every line once (rank 0), not once per process."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import yaml

from pivotseg.cli.main import main
from pivotseg.engine import read_metrics
from pivotseg.paths import REPO_ROOT
from tests.test_dgss import config_dict, make_folder_dataset


def _config(tmp_path, run_dir) -> str:
    make_folder_dataset(tmp_path / "src", {"train": 4, "val": 2})
    make_folder_dataset(tmp_path / "tgt", {"val": 2}, seed=1, shift=25)
    data = config_dict(tmp_path, run_dir)
    data["train"]["iterations"] = 4
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _resume_command(out: str) -> list[str]:
    lines = [line for line in out.splitlines() if "resume with: " in line]
    assert len(lines) == 1, out
    return shlex.split(lines[0].split("resume with: ", 1)[1])


def test_stop_at_prints_the_command_that_resumes(tmp_path, capsys):
    run = tmp_path / "my run"  # a space: the printed command must quote it
    assert main(["train", _config(tmp_path, run), "--stop-at", "2"]) == 0
    out = capsys.readouterr().out
    assert f"stopped at iteration 2 of 4 as asked; saved {run / 'checkpoints'}" in out
    command = _resume_command(out)
    assert command[:2] == ["pivotseg", "train"]
    assert main(command[1:]) == 0
    assert [r["iter"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    finished = capsys.readouterr().out
    assert "resume with" not in finished and f"run folder: {run}" in finished


def test_torchrun_prints_each_line_once(tmp_path):
    config = _config(tmp_path, tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pivotseg", "train", config, "train.per_device_batch_size=1", "--stop-at", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder: ") == 1, done.stdout
    assert _resume_command(done.stdout)[-2:] == ["--resume", str(tmp_path / "two")]
