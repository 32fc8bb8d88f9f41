"""Offline self-training with source replay (DAFormer-style UDA), with SPL's set pivots.

One step (``spl``; ``selftrain`` = without the pivot parts):

1. the teacher (EMA of the student) predicts a target crop and its flip (and the crop at each
   other ``teacher_scales``, default none with replay); the averaged softmax
   gives pseudo-labels on every pixel and the confidence ``c``; the crop's pseudo-label weight
   is ``q`` = share of its pixels with ``c > tau`` (DAFormer's quality estimate); with
   ``target_selection="class_balanced"`` only the pixels above their class's CBST threshold
   keep a pseudo-label, at weight 1;
2. spl: the set pivots move toward the class means of the teacher's pivot-block tokens over
   pixels with ``c > tau`` (:func:`~pivotseg.tasks.adapt.selftrain.move_pivots`);
3. ClassMix: half of a labelled source crop's classes are pasted onto the target crop with their
   source labels (weight 1); the rest keeps the target's pseudo-labels (weight ``q``); colour
   jitter and blur go on the mixed image;
4. the student takes one Adam step on the source crop's cross-entropy plus the mixed image's
   weighted cross-entropy (one forward of both), plus (``entropy_weight``) the entropy of its
   prediction on the mixed image's target pixels, plus (spl) DPFT's pivot loss over both images
   against the moved pivots (source classes with their labels, selected target ones);
5. the teacher's EMA, and the drift guard's reset to the source (as source-free).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pivotseg.heads.base import IGNORE_INDEX
from pivotseg.segmenter import Segmenter
from pivotseg.tasks.adapt.replay import SourceReplay, class_mix, strong_augment
from pivotseg.tasks.adapt.selftrain import SelfTrainer, _coverage, mean_entropy, move_pivots
from pivotseg.tasks.adapt.settings import AdaptSettings


def weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pixel_weight: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy with per-pixel weights, normalised as torch's class-weighted mean (by the
    summed class weights of the labelled pixels), so that ``pixel_weight`` q < 1 scales the term
    down as DAFormer's ``seg_weight`` does; a zero with a graph when no pixel is labelled."""
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    per_pixel = F.cross_entropy(
        logits, labels, weight=class_weight, ignore_index=IGNORE_INDEX, reduction="none"
    )
    safe = labels.clamp_max(logits.shape[1] - 1)
    norm = class_weight[safe][valid].sum() if class_weight is not None else valid.sum()
    if pixel_weight is not None:
        per_pixel = per_pixel * pixel_weight
    return per_pixel.sum() / norm


class ReplayTrainer(SelfTrainer):
    """Mean-teacher self-training with source replay and ClassMix (DAFormer), optionally SPL.

    Args:
        model: the segmenter; its adapted parameters (declared ones, plus the head by default)
            are the student.
        settings: the hyperparameters (None fields take the replay defaults).
        pivots: SPL mode: move DPFT's set pivots and add its pivot loss.
        source: the labelled source crops (:class:`SourceReplay`).
    """

    replay = True

    def __init__(
        self, model: Segmenter, settings: AdaptSettings, pivots: bool, source: SourceReplay
    ):
        super().__init__(model, settings, pivots)
        self.source = source
        self.rng = np.random.default_rng([settings.seed, 7])
        self.mix_generator = torch.Generator().manual_seed(settings.seed + 7919)
        # The head's own class weights (a buffer on the model's device), as in source training.
        self.class_weight = getattr(model.head, "ce_class_weights", None)

    def crops(self, images: list[np.ndarray], fill: torch.Tensor, device) -> torch.Tensor:
        """Target crops of the source crop's size, ``(B, 3, h, w)`` 0-255 on ``device``."""
        crops = [self.source.target_crop(im, self.rng) for im in images]
        return torch.stack([torch.from_numpy(c).permute(2, 0, 1) for c in crops]).float().to(device)

    def step(self, images: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One step on target crops ``images`` (``valid``: their real pixels)."""
        model, tuning, s = self.model, self.model.tuning, self.settings
        device = images.device
        probs, plain, tokens, source_pred = self._predict(images)
        conf, pseudo = probs.max(1)
        if s.target_selection == "class_balanced":
            confident = self.thresholds.select(conf, pseudo, valid)
        else:
            confident = valid & (conf > s.pseudo_threshold)
        real = valid.flatten(1).sum(1).clamp_min(1)
        quality = confident.flatten(1).sum(1) / real  # (B,) DAFormer's q
        ignore = torch.full_like(pseudo, IGNORE_INDEX)
        sure = torch.where(confident, pseudo, ignore)
        if s.target_selection == "class_balanced":  # the selected pixels, each at weight 1
            pseudo, target_weight = sure, torch.ones_like(conf)
        else:  # every pixel, the image at DAFormer's weight q
            pseudo = torch.where(valid, pseudo, ignore)
            target_weight = quality[:, None, None].expand_as(conf)
        target_weight = target_weight * s.target_weight
        moved = (
            move_pivots(tuning, tokens, sure, s.pivot_momentum, s.pivot_min_tokens)
            if self.pivots
            else []
        )

        src_images, src_labels = self.source.batch(images.shape[0])
        src_images, src_labels = src_images.to(device), src_labels.to(device)
        if s.class_mix:
            mask = class_mix(src_images, src_labels, images, self.mix_generator)
            mixed = torch.where(mask[:, None], src_images, images)
            mixed = strong_augment(mixed, self.mix_generator)
            mixed_labels = torch.where(mask, src_labels, pseudo)
            mixed_weight = torch.where(mask, torch.ones_like(conf), target_weight)
            pivot_labels = torch.where(mask, src_labels, sure)
        else:
            mask = torch.zeros_like(valid)
            mixed, mixed_labels, pivot_labels = images, pseudo, sure
            mixed_weight = target_weight
        target_pixels = valid & ~mask
        terms = self._optimise(
            lambda: self._replay_losses(
                src_images,
                src_labels,
                mixed,
                (mixed_labels, mixed_weight, target_pixels),
                pivot_labels,
            )
        )
        record = {
            "pseudo_quality": float(quality.mean()),
            "mixed_share": float(mask.float().mean()),
            "coverage_per_class": _coverage(sure, valid, model.config.num_classes),
            **{k: float(v.detach()) for k, v in terms.items()},
            **self._check_drift(plain, source_pred, valid),
        }
        if self.pivots:
            record["pivots_moved"] = moved
        return probs, record

    def _replay_losses(self, src, src_labels, mixed, mixed_targets, pivot_labels):
        """Source CE, the mixed image's weighted CE (``mixed_targets``: labels, pixel weights,
        and its target pixels, where the entropy term acts), and (spl) the pivot loss."""
        tuning, s = self.model.tuning, self.settings
        weight = self.class_weight
        mixed_labels, mixed_weight, target_pixels = mixed_targets
        n = src.shape[0]
        # DPFT caches its PFF outputs for the pivot loss only in training mode.
        tuning.train(self.pivots)
        try:
            logits = self.model(torch.cat([src, mixed])).float()
            terms = {
                "loss_source": weighted_cross_entropy(logits[:n], src_labels, None, weight),
                "loss_target": weighted_cross_entropy(
                    logits[n:], mixed_labels, mixed_weight, weight
                ),
            }
            if s.entropy_weight * s.target_weight > 0:
                terms["loss_entropy"] = (
                    s.entropy_weight * s.target_weight * mean_entropy(logits[n:], target_pixels)
                )
            if self.pivots:
                # eval mode: the pivot loss without the training-time EMA of the pivots toward
                # labelled features (move_pivots moved them toward the target instead)
                tuning.eval()
                terms.update(tuning.extra_loss(torch.cat([src_labels, pivot_labels])))
        finally:
            tuning.eval()
        return terms
