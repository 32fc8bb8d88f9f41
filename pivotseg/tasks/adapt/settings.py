"""Hyperparameters of test-time adaptation, with the reason for each default.

Every default was fixed from the source side (the source recipe, the budget, the papers) before
any target number was seen; none was tuned on target labels. docs/methods.md ("SPL mode")
explains them at more length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pivotseg.errors import ConfigError

ADAPT_METHODS = ("auto", "spl", "selftrain", "tent")
TARGET_SELECTIONS = ("quality", "class_balanced")

# Mode-dependent defaults (a field left at None takes the value of its mode). Source-free: the
# online stream, or offline with ``source_replay=False``. Replay: offline with the run's labelled
# source data beside the target (DAFormer-style UDA). Chosen on the source-side proxy
# (bench/adapt_proxy.py, docs/methods.md "SPL mode"), never on target labels.
SOURCE_FREE_DEFAULTS = {
    "lr": 1e-4,
    "restore_prob": 0.01,
    "adapt_head": False,
    "entropy_weight": 1.0,
    "adapt_norms": True,
    "teacher_momentum": 0.9,
    "teacher_scales": (0.75, 1.0, 1.25),
}
REPLAY_DEFAULTS = {
    "lr": 1e-4,
    "restore_prob": 0.0,
    "adapt_head": True,
    "entropy_weight": 1.0,
    "adapt_norms": True,
    "teacher_momentum": 0.9,
    "teacher_scales": (1.0,),
}


@dataclass
class AdaptSettings:
    """How to adapt a trained segmenter to unlabelled target images.

    Attributes:
        method: ``spl`` (DPFT: self-training of the dynamic parts plus set pivots moved toward
            the target; a run trained with ``pivot_loss`` or ``presence_gating`` on, both off
            by default), ``selftrain`` (the same mean-teacher self-training, no pivots; any
            method that declares ``adaptable_parameters``), ``tent`` (entropy minimisation of
            the normalisation layers' affine parameters), or ``auto`` (selftrain when the method
            declares adaptable parameters, else tent; never spl, whose pivot parts measured no
            effect: docs/methods.md, "SPL mode").
        steps: optimiser steps (the budget); ``None``: one pass over the images.
        batch_size: images per step (different sizes are padded and the padding ignored); with
            source replay also the number of labelled source crops per step.
        source_replay: offline only (``spl``/``selftrain``): each step also trains on labelled
            crops of the run's source dataset (``data.source`` of its config.yaml) and on
            ClassMix images (source classes pasted onto the target), DAFormer-style. Off by
            default: on the source-side proxy source-free self-training with the multi-scale
            teacher beat it (+1.66 against +1.30 mIoU, paired +0.36 [+0.13, +0.59] over 3
            seeds; docs/methods.md). The stream (online) has no source and ignores it.
        lr: Adam learning rate (None: the mode's default, see ``REPLAY_DEFAULTS`` and
            ``SOURCE_FREE_DEFAULTS``); source-free 1e-4 is a tenth of the CPU recipes' source
            lr (a student at 5e-4 collapsed in the measurement of methods.md section 9).
        adapt_head: the segmentation head joins the student (None: on with source replay,
            whose labelled source loss anchors it; off source-free, where nothing does).
        pseudo_threshold: source replay with ``target_selection="quality"``: DAFormer's tau; a
            target image's pseudo-label loss is weighted by the share of its pixels whose
            teacher confidence exceeds it, and only those pixels move pivots and enter the
            pivot loss.
        target_selection: source replay: which target pixels carry pseudo-labels.
            ``quality`` (DAFormer): every pixel, the image weighted by the share above
            ``pseudo_threshold``; ``class_balanced`` (CBST): the pixels that pass their class's
            threshold (``class_fraction``, ``confidence_floor``), weight 1, the same selection
            as source-free self-training; they also move the pivots.
        entropy_weight: weight of an entropy term (TENT's loss) on the student's prediction of
            the target pixels, beside the pseudo-label loss: a signal on every pixel, where
            confident pseudo-labels are few. 0 turns it off. None: 1 (the proxy's choice in
            both modes).
        target_weight: source replay: weight of every target term (the pseudo-label loss of
            the target pixels and the entropy term). 0 with ``class_mix=False`` is the control
            that separates adaptation from continued source training: the same steps on the
            labelled source crops alone, no target signal (bench/adapt.py's ``replay-only``,
            run as ``selftrain``: spl's pivot update is not weighted).
        adapt_norms: the affine parameters of every normalisation layer (TENT's set: the
            frozen backbone's included) join the student; the saved run carries them. None:
            on (the proxy's choice in both modes).
        class_mix: source replay: ClassMix (half of the source crop's classes pasted onto the
            target crop with their source labels) plus colour jitter and blur on the student's
            input; off: the target crop and its pseudo-labels as they are.
        teacher_momentum: EMA momentum of the mean teacher (None: 0.9, a memory of ~10
            steps, in both modes): at 0.99 the deployed teacher of a 40-step budget still
            agreed with the source model on 98.6 % of the proxy's pixels (CoTTA's 0.999 suits
            its 40 x 400 steps); with replay 0.9 doubled the proxy gain, and source-free the
            earlier recipe (0.99, no entropy term, no norms) left the proxy unchanged (+0.0)
            where 0.9 with the entropy term and the norms gained (docs/methods.md).
        teacher_scales: the image scales the teacher's prediction averages, each with its
            horizontal flip (multi-scale test-time augmentation of the pseudo-labels; the
            student, the deployed model and the drift guard's source model see scale 1). 1 must
            be among them. None: source-free 0.75, 1, 1.25 (on the proxy +1.06 mIoU over the
            flip alone, 3 seeds; the teacher runs six forwards instead of two); with source
            replay 1 only (the image and its flip: there the scales changed nothing, +0.01, as
            DAFormer's confidence threshold keeps fewer of the smoother pixels). The stream's prediction
            of a frame is this average too (CoTTA scores its augmented teacher).
        restore_prob: per-element chance per step that a student parameter returns to its
            source value (CoTTA's stochastic restore; None: 0.01 source-free, 0 with source
            replay, whose source loss guards forgetting as in DAFormer).
        class_fraction: class-balanced selection (CBST): each class keeps the most confident
            ``class_fraction`` of the pixels the teacher gives it, so small classes get
            pseudo-labels too (a global 0.9 threshold left them none).
        confidence_floor: no pseudo-label below this teacher confidence, whatever the class.
        threshold_momentum: the per-class thresholds are an EMA over steps (one batch of a
            stream is too few pixels for a quantile of a rare class).
        pivot_momentum: EMA momentum of the set pivots toward target class means (spl); 0.99
            moves a pivot about 63% of the way in 100 updates.
        pivot_min_tokens: a class updates its pivot from a batch only with at least this many
            tokens of the pivot block confidently labelled with it (half a token's pixels).
        collapse_ratio: reset to the source when the teacher's smoothed confidence falls below
            this fraction of the source model's on the same images.
        min_agreement: reset to the source when the smoothed share of pixels where teacher and
            source model agree falls below this (real adaptation relabels far fewer pixels).
        smoothing: EMA momentum of those two drift statistics.
        resize_short: resize images to this short side first (default: the run's
            ``data.eval_resize_short``, so adaptation sees images as evaluation does); without
            one the long side is capped at the run's ``data.max_size``, and an image below the
            model's minimum side is enlarged to it, as ``pivotseg predict`` sizes images.
        seed: image order and stochastic restore.
    """

    method: str = "auto"
    steps: int | None = None
    batch_size: int = 1
    source_replay: bool = False
    lr: float | None = None
    adapt_head: bool | None = None
    pseudo_threshold: float = 0.968
    target_selection: str = "quality"
    entropy_weight: float | None = None
    target_weight: float = 1.0
    adapt_norms: bool | None = None
    class_mix: bool = True
    teacher_momentum: float | None = None
    teacher_scales: tuple[float, ...] | None = None
    restore_prob: float | None = None
    class_fraction: float = 0.5
    confidence_floor: float = 0.5
    threshold_momentum: float = 0.9
    pivot_momentum: float = 0.99
    pivot_min_tokens: int = 4
    collapse_ratio: float = 0.9
    min_agreement: float = 0.5
    smoothing: float = 0.9
    resize_short: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in ADAPT_METHODS:
            raise ConfigError(
                f"adapt method {self.method!r}: use one of {', '.join(ADAPT_METHODS)}"
            )
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps={self.steps}: give a positive number of steps")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: give at least 1")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: give a positive learning rate")
        for name in (
            "pseudo_threshold",
            "teacher_momentum",
            "restore_prob",
            "class_fraction",
            "confidence_floor",
            "threshold_momentum",
            "pivot_momentum",
            "collapse_ratio",
            "min_agreement",
            "smoothing",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value}: give a value in [0, 1]")
        if self.class_fraction == 0.0:
            raise ConfigError("class_fraction=0 selects no pixel; give a value in (0, 1]")
        if self.target_selection not in TARGET_SELECTIONS:
            raise ConfigError(
                f"target_selection={self.target_selection!r}: use one of "
                f"{', '.join(TARGET_SELECTIONS)}"
            )
        if self.entropy_weight is not None and self.entropy_weight < 0:
            raise ConfigError(f"entropy_weight={self.entropy_weight}: give 0 or more")
        if self.target_weight < 0:
            raise ConfigError(f"target_weight={self.target_weight}: give 0 or more")
        if self.teacher_scales is not None:
            self._check_teacher_scales()
        if self.pivot_min_tokens < 1:
            raise ConfigError(f"pivot_min_tokens={self.pivot_min_tokens}: give at least 1")
        if self.resize_short is not None and self.resize_short < 1:
            raise ConfigError(f"resize_short={self.resize_short}: give a positive size")

    def _check_teacher_scales(self) -> None:
        self.teacher_scales = tuple(float(x) for x in self.teacher_scales)
        if 1.0 not in self.teacher_scales or any(x <= 0 for x in self.teacher_scales):
            raise ConfigError(
                f"teacher_scales={list(self.teacher_scales)}: give positive scales with 1 among "
                "them (e.g. 0.75 1 1.25)"
            )

    @classmethod
    def with_overrides(cls, base: AdaptSettings | None = None, **overrides) -> AdaptSettings:
        """``base`` (default settings when None) with the given fields replaced."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown adapt setting(s) {', '.join(unknown)}; known: {sorted(names)}"
            )
        data = asdict(base) if base is not None else {}
        return cls(**{**data, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, replay: bool) -> AdaptSettings:
        """A copy with every None field set to its mode's default (``replay``: source replay
        on, i.e. offline self-training with a reachable source; else source-free)."""
        if not replay and self.target_weight != 1.0:
            raise ConfigError(
                f"target_weight={self.target_weight} weighs the target against replayed source "
                "data; source-free adaptation (tent, the stream, source_replay=False) has only "
                "the target: leave it at 1"
            )
        defaults = REPLAY_DEFAULTS if replay else SOURCE_FREE_DEFAULTS
        given = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return AdaptSettings.with_overrides(self, source_replay=replay, **given)
