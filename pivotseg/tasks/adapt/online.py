"""Online adaptation while predicting: each frame (or small batch) is predicted, then the model
takes one adaptation step on it, so a model deployed on a stream follows its conditions.

The prediction of a frame is made before the step on that frame: the teacher's prediction
averaged over flips and ``teacher_scales`` for ``spl``/``selftrain`` (as CoTTA scores), the
forward that computes the entropy for ``tent`` (as TENT's ``forward_and_adapt``). Frames are segmented whole (no sliding window),
at the size ``size_for`` gives, and the labels brought back to the frame's size. No label is
read by the adaptation; :func:`evaluate_stream` scores the predictions of a labelled stream as
they are made (CoTTA's protocol).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pivotseg.data.transforms import resize_image
from pivotseg.segmenter import Segmenter
from pivotseg.tasks.adapt.adapter import build_adapter
from pivotseg.tasks.adapt.images import SizeFn, stack
from pivotseg.tasks.adapt.params import only_these_require_grad
from pivotseg.tasks.adapt.settings import AdaptSettings
from pivotseg.tasks.dgss.predict import resize_policy_for


@dataclass
class AdaptedFrame:
    """One frame of the stream: its key, the image, the label map and the class probabilities
    ``(K, H, W)`` at its size, the step's stats."""

    key: Hashable
    image: np.ndarray
    labels: np.ndarray
    stats: dict
    probs: torch.Tensor


def _batches(frames: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def adapt_stream(
    model: Segmenter,
    frames: Iterable[tuple[Hashable, np.ndarray]],
    settings: AdaptSettings | None = None,
    size_for: SizeFn | None = None,
    **overrides,
) -> Iterator[AdaptedFrame]:
    """Predict each frame, then adapt on it.

    Args:
        model: the segmenter, on its device; it is adapted in place (the teacher is left in it
            when the stream ends or the generator is closed).
        frames: ``(key, uint8 (H, W, 3) RGB image)`` in stream order (e.g. file paths as keys).
        settings: hyperparameters; ``overrides`` replace fields (``method``, ``batch_size``...).
            ``steps`` is ignored: one step per batch of frames.
        size_for: ``(h, w) -> (h', w')`` the size to segment a frame at; default: what
            ``pivotseg predict`` uses (:func:`~pivotseg.tasks.dgss.predict.resize_policy_for`:
            ``settings.resize_short``, else the run's evaluation resize, the run's long-side cap,
            and frames smaller than the model's minimum side enlarged).

    Raises:
        ConfigError: the model's tuning method cannot adapt that way.
    """
    settings = AdaptSettings.with_overrides(settings, **overrides)
    if size_for is None:
        run_cfg = getattr(model, "run_config", None)
        size_for = resize_policy_for(run_cfg, model, settings.resize_short, None).size_for

    adapter = build_adapter(model, settings)
    device = model.pixel_mean.device
    fill = model.pixel_mean.flatten()
    try:
        with only_these_require_grad(model, list(adapter.params.values())):
            for batch in _batches(frames, settings.batch_size):
                inputs = [resize_image(image, size_for(*image.shape[:2])) for _, image in batch]
                pixels, valid = stack(inputs, fill, device)
                probs, stats = adapter.step(pixels, valid)
                for i, ((key, image), small) in enumerate(zip(batch, inputs)):
                    p = probs[i : i + 1, :, : small.shape[0], : small.shape[1]]
                    size = tuple(image.shape[:2])
                    if tuple(p.shape[-2:]) != size:
                        p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                    yield AdaptedFrame(key, image, p.argmax(1)[0].cpu().numpy(), stats, p[0])
    finally:
        adapter.finish()


def stream_labeller(settings: AdaptSettings | None = None, **overrides):
    """A ``labeller`` for :func:`pivotseg.tasks.dgss.predict`: ``(model, frames, size_for) ->
    (path, image, labels)`` by :func:`adapt_stream` (``pivotseg predict --adapt``)."""
    settings = AdaptSettings.with_overrides(settings, **overrides)

    def labeller(model: Segmenter, frames, size_for: SizeFn | None):
        for frame in adapt_stream(model, frames, settings, size_for=size_for):
            yield frame.key, frame.image, frame.labels

    return labeller


def evaluate_stream(
    model: Segmenter,
    dataset,
    settings: AdaptSettings | None = None,
    label: str = "stream",
    **overrides,
) -> dict:
    """Online adaptation scored as it happens: the frames of ``dataset`` in its order are the
    stream; each is predicted (before the step on it, :func:`adapt_stream`) and the prediction
    is scored against its label, which the adaptation never sees.

    Args:
        model: the segmenter, adapted in place (it holds the teacher at the end).
        dataset: a labelled dataset with evaluation transforms (images as the model should see
            them; the label at its own size, logits resized to it as in evaluation).
        settings, overrides: as for :func:`adapt_stream` (``method``, ``seed``...).
        label: the dataset's name in error messages.

    Returns:
        ``{"miou", "acc", "macc", "iou", "classes", "frames"}`` in percent, as one target of
        :func:`~pivotseg.tasks.dgss.evaluate.evaluate_datasets`; a model of another taxonomy is
        scored through the same class bridge.
    """
    from pivotseg.evaluation import ConfusionMatrix
    from pivotseg.tasks.dgss.evaluate import TaxonomyBridge, as_percent, score_into

    classes = list(dataset.classes)
    bridge = TaxonomyBridge(
        getattr(model.config, "class_names", None), model.config.num_classes, classes, label
    )
    matrix = ConfusionMatrix(len(classes))
    labels: dict[int, torch.Tensor] = {}

    def frames():
        for index in range(len(dataset)):
            item = dataset[index]
            labels[index] = item["label"]
            image = item["image"].round().clamp(0, 255).to(torch.uint8)
            yield index, image.permute(1, 2, 0).numpy()

    keep = {"size_for": lambda h, w: (h, w)}  # the dataset's transform has sized the frames
    for frame in adapt_stream(model, frames(), settings, **keep, **overrides):
        truth = labels.pop(frame.key)[None].to(frame.probs.device)
        score_into(matrix, bridge, frame.probs[None].clamp_min(1e-12).log(), truth)
    return {**as_percent(matrix.compute()), "classes": classes, "frames": len(dataset)}
