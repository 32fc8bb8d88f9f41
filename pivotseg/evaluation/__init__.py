"""Segmentation metrics (dataset-level confusion matrix) and whole / sliding-window inference."""

from pivotseg.evaluation.inference import (
    resize_logits,
    slide_inference,
    whole_inference,
    window_starts,
)
from pivotseg.evaluation.metrics import ConfusionMatrix, mean_over_targets

__all__ = [
    "ConfusionMatrix",
    "mean_over_targets",
    "resize_logits",
    "slide_inference",
    "whole_inference",
    "window_starts",
]
