"""The run folders of ``bench dg``: which ones are reused, resumed, started again or replaced.

A run folder ``OUT/<row>/seed<N>`` found again is

* ``finished`` (it has ``bench.json``) and reused, when its resolved ``config.yaml``, the
  pivotseg version of its ``env.json`` and its evaluation frames match the run asked for now;
* ``resume``: unfinished with a checkpoint, under matching settings: continued from it;
* ``restart``: unfinished without a checkpoint (or holding only other files): trained again in
  place, its run files replaced and anything else kept;
* ``changed``: made with other settings or another pivotseg version. Nothing is deleted: the
  benchmark refuses before it trains anything, or, with ``--rerun``, moves the folder aside to
  ``seed<N>.old-<k>`` and trains the run again.
"""

from __future__ import annotations

import json
from pathlib import Path

from pivotseg.config import RunConfig, config_differences, load_config
from pivotseg.engine.run_lock import LOCK_NAME, RunLock
from pivotseg.errors import ConfigError
from pivotseg.naming import closest

NEW, FINISHED, RESUME, RESTART, CHANGED = "new", "finished", "resume", "restart", "changed"

# ``--quick``: a smoke run that checks the pipeline end to end in minutes; its numbers are not
# results. The user's overrides come after these and win.
QUICK_SEEDS = [0]
QUICK_OVERRIDES = [
    "train.iterations=10",
    "train.warmup_iters=2",
    "train.eval_every=0",  # 0 = only at the end
    "train.checkpoint_every=0",
    "train.log_every=5",
]
QUICK_EVAL_FRAMES = 4  # evenly spaced frames per evaluation dataset (val and each target)
QUICK_OUT = Path("runs/bench_dg_quick")


def check_rows(labels: list[str], models: dict, variants: dict, slug) -> None:
    """Refuse, before anything trains, rows whose method does not exist and labels that would
    share a folder."""
    from pivotseg.tuning import METHODS

    for label in labels:
        if label in models:
            continue
        method = variants.get(label, (label, {}))[0]
        if method not in METHODS:
            close = closest(method, METHODS)
            hint = f"; did you mean {close}?" if close else ""
            if "=" in method:  # argparse gives --methods the overrides written after it
                hint = "; write key=value overrides before --methods"
            raise ConfigError(
                f"bench dg: unknown method {method!r}{hint} (known: {', '.join(METHODS)}; a row "
                "with a model of its own is --row LABEL=MODEL_YAML)"
            )
    folders: dict[str, str] = {}
    for label in labels:
        other = folders.setdefault(slug(label), label)
        if other != label:
            raise ConfigError(
                f"bench dg: rows {other!r} and {label!r} would share the folder {slug(label)}; "
                "rename one"
            )


def run_state(run_dir: Path, wanted: RunConfig, eval_frames: int | None) -> tuple[str, str]:
    """``(state, what differs)`` of ``run_dir`` for the run ``wanted``; see the module doc."""
    if not (run_dir / "config.yaml").is_file():
        if (run_dir / "checkpoints" / "last").is_dir():
            return CHANGED, "it has checkpoints but no config.yaml to compare"
        if run_dir.is_dir() and any(e.name != LOCK_NAME for e in run_dir.iterdir()):
            return RESTART, ""
        return NEW, ""
    changes = _differences(run_dir, wanted, eval_frames)
    if changes:
        return CHANGED, changes
    if (run_dir / "bench.json").is_file():
        return FINISHED, ""
    if (run_dir / "checkpoints" / "last").is_dir():
        return RESUME, ""
    return RESTART, ""


def _differences(run_dir: Path, wanted: RunConfig, eval_frames: int | None) -> str:
    import pivotseg

    try:
        saved = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        return f"its config.yaml no longer loads ({err})"
    # train() fills in run_dir and the class names from the data; they are not settings.
    keys = [
        k
        for k in config_differences(saved, wanted)
        if k != "run_dir" and not (k == "model.class_names" and wanted.model.class_names is None)
    ]
    out = [", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")]
    env = _read_json(run_dir / "env.json")
    if env is not None and env.get("pivotseg") != pivotseg.__version__:
        out.append(f"pivotseg {env.get('pivotseg')} (now {pivotseg.__version__})")
    bench = _read_json(run_dir / "bench.json")
    if bench is not None and bench.get("eval_frames") != eval_frames:
        frames = bench.get("eval_frames") or "all"
        out.append(f"evaluated on {frames} frames per dataset (now {eval_frames or 'all'})")
    return "; ".join(part for part in out if part)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def changed_message(changed: list[tuple[Path, str]], out_dir: Path) -> str:
    """One line: which runs differ from what is asked, and the two ways on."""
    first, why = changed[0]
    more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    return (
        f"bench dg: {first} was made with other settings ({why}){more}; pass --rerun to move "
        f"such runs aside (to <folder>.old-<k>) and train them again, or choose another --out "
        f"than {out_dir}"
    )


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to the first free ``<name>.old-<k>`` beside it (refused while a
    process trains in it); returns the new path."""
    k = 1
    while (target := run_dir.with_name(f"{run_dir.name}.old-{k}")).exists():
        k += 1
    lock = RunLock(run_dir).acquire()
    try:
        run_dir.rename(target)
    except BaseException:
        lock.release()
        raise
    lock.release(moved_to=target)
    return target
