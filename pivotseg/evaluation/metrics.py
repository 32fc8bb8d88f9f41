"""Dataset-level segmentation metrics from a confusion matrix (mIoU as DGSS papers report it)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix (rows: label, columns: prediction).

    Pixels labelled ``ignore_index`` are skipped. IoU of class k is
    ``TP / (TP + FP + FN)``; a class absent from both labels and predictions has NaN IoU and is
    left out of the mean (``nanmean``), as in mmseg.

    Args:
        num_classes: K.
        ignore_index: label value that is not scored.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred, label) -> None:
        """Add predictions and labels of the same shape (``(B, H, W)`` or ``(H, W)``, integers).

        Raises:
            ValueError: on shape mismatch, or a prediction / label outside ``0..K-1`` (labels
                may also be ``ignore_index``).
        """
        pred = torch.as_tensor(pred)
        label = torch.as_tensor(label, device=pred.device)
        if pred.shape != label.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}; "
                "resize the logits to the label size before argmax"
            )
        k = self.num_classes
        keep = label != self.ignore_index
        pred, label = pred[keep].long(), label[keep].long()
        if label.numel() and (label.min() < 0 or label.max() >= k):
            raise ValueError(f"label values outside 0..{k - 1} (and {self.ignore_index})")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"predicted classes outside 0..{k - 1}")
        counts = torch.bincount(label * k + pred, minlength=k * k).reshape(k, k)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over processes when ``torch.distributed`` is initialised (else no-op)."""
        if dist.is_available() and dist.is_initialized():
            device = self.matrix.device
            if dist.get_backend() == "nccl" and device.type != "cuda":
                moved = self.matrix.cuda()
                dist.all_reduce(moved)
                self.matrix = moved.to(device)
            else:
                dist.all_reduce(self.matrix)
        return self

    def compute(self) -> dict:
        """``dict(iou=[per class, NaN if absent], miou, acc, macc, class_acc)``, as fractions.

        ``acc`` is pixel accuracy; ``macc`` the mean of per-class accuracies (recall) over
        classes present in the labels.
        """
        m = self.matrix.double().cpu().numpy()
        tp = np.diag(m)
        label_area = m.sum(1)
        pred_area = m.sum(0)
        union = label_area + pred_area - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            class_acc = np.where(label_area > 0, tp / label_area, np.nan)
        total = m.sum()
        return {
            "iou": [float(v) for v in iou],
            "miou": _nanmean(iou),
            "acc": float(tp.sum() / total) if total > 0 else math.nan,
            "macc": _nanmean(class_acc),
            "class_acc": [float(v) for v in class_acc],
        }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def mean_over_targets(results: dict[str, dict]) -> float:
    """Mean of the per-target mIoU (how DGSS papers report an "Avg." column).

    Args:
        results: target name -> the dict of :meth:`ConfusionMatrix.compute`.
    """
    if not results:
        raise ValueError("mean_over_targets: no targets given")
    return float(np.mean([r["miou"] for r in results.values()]))
