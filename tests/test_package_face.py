"""The package's face (lazy top-level names, engine's exports), the bench scripts' imports and
the refseg options that moved from the CLI into the task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pivotseg.errors import ConfigError
from pivotseg.paths import REPO_ROOT

FACE_PROBE = """
import json, sys
import pivotseg
before = sorted(m for m in ("torch", "transformers") if m in sys.modules)
import pivotseg.config, pivotseg.segmenter, pivotseg.tasks.dgss as dgss
same = {
    "load_config": pivotseg.load_config is pivotseg.config.load_config,
    "build_segmenter": pivotseg.build_segmenter is pivotseg.segmenter.build_segmenter,
    "load_segmenter": pivotseg.load_segmenter is pivotseg.segmenter.load_segmenter,
    "train": pivotseg.train is dgss.train,
    "evaluate": pivotseg.evaluate is dgss.evaluate,
    "predict": pivotseg.predict is dgss.predict,
}
print(json.dumps({"before": before, "same": same, "all": sorted(pivotseg.__all__)}))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_top_level_names_are_the_task_functions_and_load_lazily():
    done = subprocess.run(
        [sys.executable, "-c", FACE_PROBE],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=_clean_env(),
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["before"] == []
    assert all(found["same"].values()), found["same"]
    assert found["all"] == sorted(["__version__", *found["same"]])


def test_unknown_top_level_name_is_an_attribute_error():
    import pivotseg

    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        pivotseg.trian  # noqa: B018
    assert not hasattr(pivotseg, "Trainer")


def test_engine_exports_only_what_tasks_and_callers_use():
    import pivotseg.engine as engine

    assert sorted(engine.__all__) == sorted(
        ["NonFiniteLoss", "Trainer", "TrainingStopped", "make_accelerator", "read_metrics"]
    )
    assert all(hasattr(engine, name) for name in engine.__all__)
    assert not hasattr(engine, "build_optimizer")  # pivotseg.engine.optim's


def test_bench_script_in_this_checkout_is_accepted(tmp_path):
    from pivotseg.benchmarking import check_checkout

    assert check_checkout(REPO_ROOT / "bench" / "dg.py") == REPO_ROOT.resolve()
    (tmp_path / "bench").mkdir()
    with pytest.raises(SystemExit) as stop:
        check_checkout(tmp_path / "bench" / "dg.py")
    message = str(stop.value)
    assert str(REPO_ROOT) in message and f"PYTHONPATH={tmp_path.resolve()}" in message


@pytest.mark.parametrize("script", ["bench/dg.py", "bench/adapt.py", "bench/adapt_oracle.py"])
def test_bench_script_runs_from_the_repository_root_without_pythonpath(script):
    done = subprocess.run(
        [sys.executable, script, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=_clean_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: {os.path.basename(script)}")


def test_bench_scripts_leave_sys_path_alone():
    # Helpers come from pivotseg.benchmarking (installed), not from the checkout put on sys.path.
    scripts = sorted((REPO_ROOT / "bench").glob("*.py"))
    assert scripts
    for script in scripts:
        assert "sys.path.insert" not in script.read_text(), script.name


def test_refseg_options_reach_only_the_methods_they_apply_to():
    from pivotseg.tasks.refseg.run import MethodSettings

    given = dict(min_match=0.5, iterations=7, transition_frames=3, multi_shot="joint")
    assert MethodSettings("persam", **given).method_kwargs() == {"min_match": 0.5}
    assert MethodSettings("persam-f", **given).method_kwargs() == {
        "min_match": 0.5,
        "iterations": 7,
    }
    assert MethodSettings("matcher", **given).method_kwargs() == {"min_match": 0.5}
    cav_sam = MethodSettings("cav-sam", ttga_steps=2, transition="crossfade", **given)
    assert cav_sam.method_kwargs() == {
        "ttga_steps": 2,
        "num_transition_frames": 3,
        "multi_shot": "joint",
        "transition": "crossfade",
    }
    with pytest.raises(ConfigError, match="cav-sam only"):
        MethodSettings("persam", transition="crossfade").method_kwargs()
    assert MethodSettings("persam-f", zoom=True).method_kwargs() == {"zoom": True}
    with pytest.raises(ConfigError, match="persam and persam-f only"):
        MethodSettings("matcher", zoom=True).method_kwargs()


def test_refseg_command_line_fills_every_method_setting():
    from pivotseg.cli import refseg as cli
    from pivotseg.cli.main import build_parser
    from pivotseg.tasks.refseg import REFSEG_METHODS

    assert cli.METHOD_NAMES == tuple(REFSEG_METHODS), "update METHOD_NAMES in cli/refseg.py"
    argv = ["refseg", "run", "--ref", "a.jpg", "--ref-mask", "a.png", "t.jpg", "--out", "o"]
    args = build_parser().parse_args([*argv, "--method", "persam-f", "--iterations", "5"])
    settings = cli.method_settings(args)
    assert (settings.method, settings.iterations, settings.device) == ("persam-f", 5, "cpu")
    assert settings.method_kwargs() == {"iterations": 5}
