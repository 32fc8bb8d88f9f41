"""Mean-teacher self-training on unlabelled target images, and SPL's set-pivot update.

One step on a batch (``spl`` = all of it; ``selftrain`` = without the pivot parts):

1. the teacher predicts the batch and its horizontal flip (and, with ``teacher_scales``, the
   batch resized by each scale and its flip); the averaged softmax gives the
   pseudo-labels and the prediction that is returned (CoTTA scores the teacher before the
   update); DPFT caches the pivot-block tokens of the unflipped view;
2. the source model predicts the batch once more (for the drift guard);
3. class-balanced selection (:class:`ClassThresholds`): a pixel keeps its pseudo-label when the
   teacher's confidence reaches its class's threshold;
4. spl: the set pivots move toward the class means of the teacher's pivot-block tokens over the
   confidently labelled tokens (:func:`move_pivots`);
5. the student (the adapted parameters in the model) takes one Adam step on cross-entropy
   against the selected pseudo-labels, plus (``entropy_weight``) the entropy of its prediction
   on every real pixel, plus (spl) DPFT's pivot loss against the moved pivots;
6. stochastic restore, the teacher's EMA, and a reset to the source when the drift guard fires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pivotseg.evaluation.inference import augmented_probabilities
from pivotseg.heads.base import IGNORE_INDEX
from pivotseg.segmenter import Segmenter
from pivotseg.tasks.adapt.params import norm_affine_parameters
from pivotseg.tasks.adapt.settings import AdaptSettings
from pivotseg.tasks.adapt.teacher import MeanTeacher
from pivotseg.tasks.dgss.predict import min_input_side
from pivotseg.tuning.pivots import class_pool, patch_classes


class ClassThresholds:
    """Per-class confidence thresholds of class-balanced self-training (CBST, Zou et al. 2018).

    For each class k the teacher predicts in a batch, the ``1 - fraction`` quantile (linear
    interpolation) of the confidences of its pixels is that batch's threshold; the kept
    threshold is an EMA of those (momentum ``momentum``, the first observation sets it). A pixel
    predicted as k is selected when its confidence is at least ``max(threshold_k, floor)``.
    """

    def __init__(self, num_classes: int, fraction: float, floor: float, momentum: float):
        self.num_classes = num_classes
        self.fraction, self.floor, self.momentum = fraction, floor, momentum
        self.values = torch.full((num_classes,), float("nan"))

    def reset(self) -> None:
        self.values = torch.full((self.num_classes,), float("nan"))

    @torch.no_grad()
    def select(self, conf: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Update the thresholds with this batch; ``(B, H, W)`` mask of selected pixels."""
        conf_valid, pred_valid = conf[valid].float(), pred[valid]
        for k in pred_valid.unique().tolist():
            q = quantile(conf_valid[pred_valid == k], 1.0 - self.fraction)
            old = float(self.values[k])
            self.values[k] = q if old != old else self.momentum * old + (1 - self.momentum) * q
        thresholds = self.values.nan_to_num(float("inf")).clamp_min(self.floor).to(conf.device)
        return valid & (conf >= thresholds[pred])


def quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile``'s linear interpolation, without its limit of 16M elements."""
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    lo = int(position)
    hi = min(lo + 1, ordered.numel() - 1)
    return float(ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo]))


class DriftGuard:
    """Fires when the teacher drifts from the source model on the images it adapts to.

    Smoothed (EMA) over steps: the teacher's mean confidence against the source model's on the
    same images, and the share of pixels where their predictions agree. It fires when the first
    falls below ``collapse_ratio`` times the second, or the agreement below ``min_agreement``;
    then it starts over.
    """

    def __init__(self, collapse_ratio: float, min_agreement: float, smoothing: float):
        self.collapse_ratio, self.min_agreement = collapse_ratio, min_agreement
        self.smoothing = smoothing
        self.stats: list[float] | None = None  # teacher conf, source conf, agreement

    def update(self, teacher_conf: float, source_conf: float, agreement: float) -> bool:
        new = [teacher_conf, source_conf, agreement]
        if self.stats is None:
            self.stats = new
        else:
            s = self.smoothing
            self.stats = [s * old + (1 - s) * x for old, x in zip(self.stats, new)]
        teacher, source, agree = self.stats
        fired = teacher < self.collapse_ratio * source or agree < self.min_agreement
        if fired:
            self.stats = None
        return fired


@torch.no_grad()
def move_pivots(
    tuning,
    tokens: dict[int, tuple[torch.Tensor, tuple[int, int], int]],
    labels: torch.Tensor,
    momentum: float,
    min_tokens: int,
) -> list[int]:
    """EMA of DPFT's set pivots toward target class means; returns the classes moved.

    A token belongs to class k when at least half of its pixels carry the (selected) pseudo-label
    k (:func:`~pivotseg.tuning.pivots.patch_classes`, as for the source pivots). A class with at
    least ``min_tokens`` such tokens in the batch moves: ``P_k <- m P_k + (1 - m) mean_k``; a
    pivot the source never set takes ``mean_k``.

    Args:
        tuning: the DPFT method (``pivot_banks``, ``backbone``, ``num_classes``).
        tokens: :meth:`DPFT.cached_pivot_tokens` of the forward that gave ``labels``.
        labels: ``(B, H, W)`` pseudo-labels, 255 where none.
    """
    strides = tuning.backbone.block_strides()
    moved: set[int] = set()
    for width, (feat, hw, index) in tokens.items():
        classes = patch_classes(labels, hw, strides[index], tuning.num_classes, IGNORE_INDEX)
        sums, counts = class_pool(feat.float(), classes, tuning.num_classes)
        sums, counts = sums.sum(0), counts.sum(0)
        bank = tuning.pivot_banks[str(width)]
        enough = counts >= min_tokens
        mean = sums / counts.clamp_min(1)[:, None]
        stepped = torch.where(bank.valid[:, None], bank.pivots.lerp(mean, 1.0 - momentum), mean)
        bank.pivots.copy_(torch.where(enough[:, None], stepped, bank.pivots))
        bank.valid |= enough
        moved.update(torch.nonzero(enough).flatten().tolist())
    return sorted(moved)


def student_parameters(
    model: Segmenter, head: bool, norms: bool = False
) -> dict[str, torch.Tensor]:
    """The tuning method's declared adaptable parameters, plus (``head``) the head's and
    (``norms``) every normalisation layer's affine parameters (TENT's set)."""
    named = dict(model.tuning.adaptable_parameters())
    if head:
        named.update((f"head.{n}", p) for n, p in model.head.named_parameters())
    if norms:
        named.update(norm_affine_parameters(model))
    return named


def mean_entropy(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean softmax entropy of ``logits`` (B, K, H, W) over the pixels ``where`` (B, H, W);
    a zero with a graph when there is none."""
    if not where.any():
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)[where].mean()


def pivot_state(model: Segmenter) -> dict[str, torch.Tensor]:
    """DPFT's pivot buffers by name (``tuning.pivot_banks.<width>.{pivots,valid}``)."""
    return {n: b for n, b in model.named_buffers() if n.startswith("tuning.pivot_banks.")}


class SelfTrainer:
    """Mean-teacher self-training of the tuning method's declared adaptable parameters.

    Args:
        model: the segmenter (its adapted parameters are the student).
        settings: the hyperparameters.
        pivots: SPL mode: move DPFT's set pivots and add its pivot loss.
    """

    replay = False

    def __init__(self, model: Segmenter, settings: AdaptSettings, pivots: bool):
        settings = settings.resolved(replay=self.replay)
        self.model, self.settings, self.pivots = model, settings, pivots
        self.name = "spl" if pivots else "selftrain"
        named = student_parameters(model, settings.adapt_head, settings.adapt_norms)
        self.params = named
        generator = torch.Generator().manual_seed(settings.seed)
        state = pivot_state(model) if pivots else {}
        self.teacher = MeanTeacher(
            named, state, settings.teacher_momentum, settings.restore_prob, generator
        )
        self.optimizer = torch.optim.Adam(named.values(), lr=settings.lr)
        k = model.config.num_classes
        self.thresholds = ClassThresholds(
            k, settings.class_fraction, settings.confidence_floor, settings.threshold_momentum
        )
        self.guard = DriftGuard(settings.collapse_ratio, settings.min_agreement, settings.smoothing)
        self.resets = 0

    def step(self, images: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One adaptation step; ``(teacher probabilities before the step (B, K, H, W), stats)``."""
        model, tuning, s = self.model, self.model.tuning, self.settings
        probs, plain, tokens, source = self._predict(images)
        conf, pseudo = probs.max(1)
        selected = self.thresholds.select(conf, pseudo, valid)
        labels = torch.where(selected, pseudo, torch.full_like(pseudo, IGNORE_INDEX))
        moved = (
            move_pivots(tuning, tokens, labels, s.pivot_momentum, s.pivot_min_tokens)
            if self.pivots
            else []
        )

        terms = self._optimise(lambda: self._student_losses(images, labels, valid))
        record = {
            "pseudo_coverage": float(selected[valid].float().mean()),
            "coverage_per_class": _coverage(labels, valid, model.config.num_classes),
            "thresholds": [None if v != v else float(v) for v in self.thresholds.values],
            **{k: float(v.detach()) for k, v in terms.items()},
            **self._check_drift(plain, source, valid),
        }
        if self.pivots:
            record["pivots_moved"] = moved
        return probs, record

    @torch.no_grad()
    def _predict(self, images: torch.Tensor):
        """``(teacher probabilities averaged over the flip and the teacher scales, the
        teacher's plain ones (scale 1, unflipped), DPFT's pivot-block tokens of that view (spl),
        the source model's probabilities)``."""
        model, tuning = self.model, self.model.tuning
        model.eval()
        with self.teacher.as_teacher():
            plain = F.softmax(model(images).float(), dim=1)
            tokens = tuning.cached_pivot_tokens() if self.pivots else {}
            probs = augmented_probs(model, images, self.settings.teacher_scales, plain)
        with self.teacher.as_source():
            source = F.softmax(model(images).float(), dim=1)
        return probs, plain, tokens, source

    def _optimise(self, losses) -> dict:
        """One Adam step of the student on the sum of ``losses()``, then the teacher's EMA;
        returns the loss terms."""
        with torch.enable_grad():  # callers may predict under no_grad (pivotseg predict)
            terms = losses()
            loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.teacher.after_student_step()
        return terms

    def _check_drift(self, plain: torch.Tensor, source: torch.Tensor, valid: torch.Tensor) -> dict:
        """Feed the drift guard; on a reset start over from the source. Its statistics."""
        teacher_conf = float(plain.max(1).values[valid].mean())
        source_conf = float(source.max(1).values[valid].mean())
        agreement = float((plain.argmax(1) == source.argmax(1))[valid].float().mean())
        reset = self.guard.update(teacher_conf, source_conf, agreement)
        if reset:
            self.teacher.reset()
            self.thresholds.reset()
            self.optimizer.state.clear()
            self.resets += 1
        return {
            "teacher_conf": teacher_conf,
            "source_conf": source_conf,
            "agreement": agreement,
            "reset": reset,
            "resets": self.resets,
        }

    def _student_losses(self, images: torch.Tensor, labels: torch.Tensor, valid) -> dict:
        tuning, s = self.model.tuning, self.settings
        # DPFT caches its PFF outputs for the pivot loss only in training mode.
        tuning.train(self.pivots)
        try:
            logits = self.model(images).float()
            if (labels != IGNORE_INDEX).any():
                ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
            else:
                ce = logits.sum() * 0.0
            terms = {"loss_ce": ce}
            if s.entropy_weight > 0:
                terms["loss_entropy"] = s.entropy_weight * mean_entropy(logits, valid)
            if self.pivots:
                # In eval mode extra_loss returns the pivot loss without its training-time EMA
                # of the pivots toward labelled features: here move_pivots does that.
                tuning.eval()
                terms.update(tuning.extra_loss(labels))
        finally:
            tuning.eval()
        return terms

    def finish(self) -> None:
        """Leave the teacher (what is deployed) in the model."""
        self.teacher.deploy()


def augmented_probs(
    model: Segmenter,
    images: torch.Tensor,
    scales=(1.0,),
    plain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of ``model`` averaged over ``images`` and their horizontal flip at every scale
    (1 among them, as ``teacher_scales`` requires;
    :func:`~pivotseg.evaluation.inference.augmented_probabilities`, a view never taken below
    the model's minimum input side): the teacher's prediction. ``plain``: the softmax of the
    unresized, unflipped images if already computed.
    """
    return augmented_probabilities(
        model, images, scales, flip=True, min_side=min_input_side(model), plain=plain
    )


def _coverage(labels: torch.Tensor, valid: torch.Tensor, num_classes: int) -> list[float]:
    """Share of the real pixels that got a pseudo-label of each class."""
    kept = labels[valid]
    counts = torch.bincount(kept[kept != IGNORE_INDEX], minlength=num_classes)[:num_classes]
    return (counts.float() / max(int(valid.sum()), 1)).tolist()
