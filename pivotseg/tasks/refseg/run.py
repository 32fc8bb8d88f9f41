"""``pivotseg refseg run`` and ``refseg eval`` as functions.

:class:`MethodSettings` turns the command-line options into a method (each option goes to the
methods it applies to); :func:`run_refseg` writes masks, overlays and ``scores.json`` for target
images; :func:`evaluate_refseg` scores k-shot episodes (:mod:`~pivotseg.tasks.refseg.episodes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pivotseg.errors import ConfigError, DataError
from pivotseg.tasks.refseg.base import ReferenceSegmenter
from pivotseg.tasks.refseg.episodes import EpisodeResult


@dataclass
class MethodSettings:
    """A method of :data:`~pivotseg.tasks.refseg.REFSEG_METHODS` and its options, as
    ``pivotseg refseg`` names them; None = the method's default."""

    method: str = "persam"
    sam: str | None = None
    device: str = "cpu"
    min_match: float | None = None
    zoom: bool | None = None
    backbone: str | None = None
    backbone_source: str | None = None
    iterations: int | None = None
    ttga_steps: int | None = None
    transition: str | None = None
    transition_frames: int | None = None
    sd_checkpoint: str | None = None
    prompt: str | None = None
    multi_shot: str | None = None
    engine: str = "torch"

    def method_kwargs(self) -> dict:
        """The chosen method's own constructor options (only those given).

        Raises:
            ConfigError: a CAV-SAM option with another method.
        """
        kw: dict = {}
        if self.method in ("persam", "persam-f", "matcher") and self.min_match is not None:
            kw["min_match"] = self.min_match
        if self.zoom:
            if self.method not in ("persam", "persam-f"):
                raise ConfigError("--zoom applies to --method persam and persam-f only")
            kw["zoom"] = True
        if self.method == "persam-f" and self.iterations is not None:
            kw["iterations"] = self.iterations
        if self.method == "cav-sam":
            if self.ttga_steps is not None:
                kw["ttga_steps"] = self.ttga_steps
            if self.transition_frames is not None:
                kw["num_transition_frames"] = self.transition_frames
            if self.multi_shot is not None:
                kw["multi_shot"] = self.multi_shot
            if self.transition == "dbst":
                from pivotseg.tasks.refseg.transitions import build_transition

                options = {"checkpoint": self.sd_checkpoint, "device": self.device}
                if self.sd_checkpoint is None:
                    options.pop("checkpoint")
                if self.prompt:
                    options["prompt"] = self.prompt
                kw["transition"] = build_transition("dbst", **options)
            elif self.transition is not None:
                kw["transition"] = self.transition
        elif self.transition or self.ttga_steps is not None:
            raise ConfigError("--transition / --ttga-steps apply to --method cav-sam only")
        return kw

    def build(self) -> ReferenceSegmenter:
        from pivotseg.tasks.refseg import build_refseg_method

        return build_refseg_method(
            self.method,
            sam=self.sam,
            device=self.device,
            backbone=self.backbone,
            backbone_source=self.backbone_source,
            engine=self.engine,
            **self.method_kwargs(),
        )


def run_refseg(
    refs: Sequence[str | Path],
    ref_masks: Sequence[str | Path],
    targets: Sequence[str | Path],
    out: str | Path,
    settings: MethodSettings,
    on_skipped: Callable[[list[Path]], None] | None = None,
    on_target: Callable[[Path, float, np.ndarray, str], None] | None = None,
) -> dict[str, dict]:
    """Segment ``targets`` (images or folders) given reference images and their masks.

    Writes ``out/<target>.png`` (0/255), ``out/<target>_overlay.jpg`` and ``out/scores.json``;
    returns what ``scores.json`` holds. The inputs are all read before the method is built, so
    a bad file stops the run before any model loads. ``on_skipped`` receives the mask files
    found beside target images (left out), ``on_target`` each target's path, score, mask and
    file stem as it is written.
    """
    from pivotseg.tasks.refseg.images import (
        check_readable,
        list_targets,
        read_image,
        read_mask,
        write_mask,
        write_overlay,
    )

    if len(refs) != len(ref_masks):
        raise ConfigError(
            f"{len(refs)} --ref images but {len(ref_masks)} --ref-mask masks; give one "
            "mask per reference, in the same order"
        )
    images = [read_image(p) for p in refs]
    masks = [read_mask(m, r.shape[:2]) for m, r in zip(ref_masks, images)]
    found, skipped = list_targets(targets, exclude=ref_masks)
    if skipped and on_skipped is not None:
        on_skipped(skipped)
    if not found:
        raise DataError(
            f"no target image in {' '.join(map(str, targets))} once the masks are left out; "
            "pass target images or folders holding them"
        )
    target_paths = [check_readable(p) for p in found]
    method = settings.build().fit(images, masks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores, used = {}, set()
    for path in target_paths:
        image = read_image(path)
        mask, score = method.segment(image)
        stem, n = path.stem, 1
        while stem in used:  # same file name in two target folders
            n += 1
            stem = f"{path.stem}_{n}"
        used.add(stem)
        write_mask(out / f"{stem}.png", mask)
        write_overlay(out / f"{stem}_overlay.jpg", image, mask)
        scores[str(path)] = {
            "mask": f"{stem}.png",
            "score": round(score, 4),
            "area": float(mask.mean()),
        }
        if on_target is not None:
            on_target(path, score, mask, stem)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores


def evaluate_refseg(
    episodes: str | Path,
    settings: MethodSettings,
    shots: int = 1,
    classes: list[str] | None = None,
    max_targets: int | None = None,
    out: str | Path | None = None,
    json_path: str | Path | None = None,
) -> EpisodeResult:
    """k-shot episodes over an FSS-1000-style folder; predicted masks to ``out/<class>/`` and
    the scores to ``json_path`` when given."""
    from pivotseg.tasks.refseg.episodes import evaluate_episodes
    from pivotseg.tasks.refseg.images import write_mask

    method = settings.build()
    on_target = None
    if out:
        out = Path(out)

        def on_target(name, path, mask, score):
            write_mask(out / name / f"{path.stem}.png", mask)

    result = evaluate_episodes(
        method,
        episodes,
        shots=shots,
        classes=classes,
        max_targets=max_targets,
        on_target=on_target,
    )
    if json_path:
        write_results_json(json_path, result, episodes, settings.method, shots, max_targets)
    return result


def write_results_json(
    path: str | Path,
    result: EpisodeResult,
    episodes: str | Path,
    method: str,
    shots: int,
    max_targets: int | None,
) -> None:
    """The episodes' scores in the schema of :mod:`pivotseg.evaluation.results`: IoU in percent
    per class (object), the targets scored per class, ``null`` for an IoU without union."""
    from pivotseg.evaluation.results import (
        dataset_entry,
        named_scores,
        percent,
        results_document,
        write_json,
    )

    names = list(result.per_class)
    entry = dataset_entry(
        Path(episodes).name,
        frames=sum(result.targets.values()),
        limit=max_targets,
        miou=percent(result.mean_iou),
        per_class=named_scores(names, [percent(result.per_class[n]) for n in names]),
    )
    entry["frames_per_class"] = dict(result.targets)
    document = results_document("refseg", [entry], method=method, shots=shots)
    write_json(path, document)
