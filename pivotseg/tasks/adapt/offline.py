"""``adapt_run``: adapt a trained run to a set of unlabelled target images, into a new run.

The new run folder has a training run's layout, so ``pivotseg eval`` / ``predict`` open it
unchanged::

    NEW_RUN/config.yaml                 the source run's config (run_dir = NEW_RUN)
    NEW_RUN/adapt.json                  source run, images, method, settings, adapted tensors
    NEW_RUN/env.json                    versions and machine
    NEW_RUN/metrics.jsonl               one record per step (teacher confidence, pseudo-label
                                        coverage per class, resets, losses)
    NEW_RUN/class_stats.json            with source replay and rare-class sampling: the source's
                                        pixel counts (copied from the source run when there)
    NEW_RUN/checkpoints/last/           segmenter.json + model.safetensors (the deployed model)

It is written into a hidden sibling folder (``.NEW_RUN.adapting-<pid>``) and renamed at the
end: an interrupted or failed adaptation leaves no ``NEW_RUN`` at all (a killed one leaves its
hidden folder, removed by the next adaptation into ``NEW_RUN``), and the source run is only
ever read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pivotseg.config import save_config
from pivotseg.engine.checkpoint import find_run_config, resolve_model_folder
from pivotseg.engine.run_folder import RunFolder, collect_env
from pivotseg.errors import ConfigError
from pivotseg.outputs import staged_dir
from pivotseg.segmenter import WEIGHTS_FILE, Segmenter
from pivotseg.tasks.adapt.adapter import build_adapter, replays_source
from pivotseg.tasks.adapt.images import list_images, load_image, stack
from pivotseg.tasks.adapt.params import only_these_require_grad
from pivotseg.tasks.adapt.replay import SourceReplay
from pivotseg.tasks.adapt.settings import AdaptSettings
from pivotseg.tasks.dgss.predict import resize_policy_for

ADAPT_FILE = "adapt.json"


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary folders of adaptations into ``out`` whose process is gone (killed)."""
    for tmp in out.parent.glob(f".{out.name}.adapting-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _run_dir(checkpoint: Path) -> Path | None:
    """The run folder above a checkpoint folder (``RUN/checkpoints/NAME``), if it is one."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _image_order(count: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Image indices of each step: passes over the images, each in a fresh shuffled order."""
    rng = np.random.default_rng(seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += rng.permutation(count).tolist()
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def save_adapted(model: Segmenter, folder: Path, adapted: Sequence[str]) -> None:
    """``model.save`` plus adapted tensors it would leave out (TENT's backbone norms: the
    backbone is rebuilt from its source, so they must travel in ``model.safetensors``; loading
    accepts backbone keys there)."""
    from safetensors.torch import load_file, save_file

    model.save(folder)
    path = folder / WEIGHTS_FILE
    state = load_file(str(path))
    tensors = dict(model.named_parameters())
    extra = {n: tensors[n].detach().cpu().contiguous() for n in adapted if n not in state}
    if extra:
        save_file({**state, **extra}, str(path))


def adapt_run(
    run: str | Path,
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    settings: AdaptSettings | None = None,
    *,
    backbone_source: str | None = None,
    device: str | None = None,
    progress: bool = True,
    **overrides,
) -> Path:
    """Adapt the model of ``run`` to ``images`` (no label is read) and save it as ``out``.

    Args:
        run: a run folder or a checkpoint folder.
        images: a folder of target images (not searched recursively) or a list of files.
        out: the new run folder; must not exist.
        settings: hyperparameters (:class:`AdaptSettings`); ``overrides`` replace fields of it
            (``method="tent"``, ``steps=50``, ...).
        backbone_source: where the pretrained backbone is, if it moved since training.
        device: ``cpu``/``cuda``... (default: a GPU when there is one).
        progress: show a progress bar.

    Returns:
        ``out``.

    Raises:
        ConfigError: ``out`` exists, or the run's tuning method cannot adapt that way.
        DataError: the image folder is missing, empty or holds an unreadable image; with
            source replay, the run's source data is not where its config.yaml says.
        CheckpointError: ``run`` is not a run or checkpoint folder.
    """
    from pivotseg.segmenter import load_segmenter

    settings = AdaptSettings.with_overrides(settings, **overrides)
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out}: exists already; give --out a new folder (nothing was written)")
    folder = resolve_model_folder(run)
    run_cfg = find_run_config(folder)
    files = list_images(images)
    if settings.resize_short is None and run_cfg is not None:
        settings.resize_short = run_cfg.data.eval_resize_short
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_segmenter(folder, backbone_source=backbone_source).to(device).eval()
    # Sized as pivotseg predict sizes them: a huge photo is capped, a tiny one enlarged.
    policy = resize_policy_for(run_cfg, model, settings.resize_short, None)
    replay = replays_source(model, settings)
    if replay and run_cfg is None:
        raise ConfigError(
            f"{folder}: source replay needs the run's config.yaml (its data.source) and none "
            "was found beside this checkpoint; adapt with --no-source-replay"
        )
    steps = settings.steps or math.ceil(len(files) / settings.batch_size)
    resolved = settings.resolved(replay)

    _remove_stale_temporaries(out)
    with staged_dir(out, "adapting") as tmp:
        record = RunFolder(tmp, tensorboard=False)
        record.write_env(collect_env())
        source = SourceReplay(run_cfg, settings.seed, tmp, _run_dir(folder)) if replay else None
        adapter = build_adapter(model, settings, source)
        start = time.time()
        fill = model.pixel_mean.flatten()
        with only_these_require_grad(model, list(adapter.params.values())):
            order = _image_order(len(files), steps, settings.batch_size, settings.seed)
            for step, indices in enumerate(tqdm(order, desc="adapt", disable=not progress), 1):
                batch = [load_image(files[i], policy.size_for) for i in indices]
                if source is not None:
                    pixels = adapter.crops(batch, fill, device)
                    valid = torch.ones_like(pixels[:, 0], dtype=torch.bool)
                else:
                    pixels, valid = stack(batch, fill, device)
                _, stats = adapter.step(pixels, valid)
                record.log({"images": [files[i].name for i in indices], **stats}, step)
        adapter.finish()
        save_adapted(model, record.checkpoints / "last", list(adapter.params))
        if run_cfg is not None:
            run_cfg.run_dir = str(out)
            save_config(run_cfg, tmp / "config.yaml")
        summary = {
            "source_run": str(Path(run).resolve()),
            "source_checkpoint": str(folder.resolve()),
            "images": str(Path(images).resolve()) if isinstance(images, (str, Path)) else None,
            "image_files": [str(p.resolve()) for p in files],
            "method": adapter.name,
            "settings": {**resolved.to_dict(), "method": adapter.name, "steps": steps},
            "source_replay": None if source is None else str(run_cfg.data.source.path),
            "resets": adapter.resets,
            "adapted_parameters": sorted(adapter.params),
            "adapted_parameter_count": sum(p.numel() for p in adapter.params.values()),
            "seconds": round(time.time() - start, 1),
            "seconds_per_frame": round((time.time() - start) / (steps * settings.batch_size), 3),
        }
        (tmp / ADAPT_FILE).write_text(json.dumps(summary, indent=2))
        record.close()
    return out
