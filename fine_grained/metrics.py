"""The three metrics of PROTOCOLS C, in percent.

Each takes classifier scores (N, K) and targets: class indices (N,) for the single-label metrics,
a 0/1 matrix (N, K) for mAP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return 100.0 * (scores.argmax(1) == targets).double().mean().item()


def confusion_matrix(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows: true class, columns: predicted class."""
    flat = targets.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes of confusion-matrix diagonal / row sum.

    Classes absent from `targets` (row sum 0) have no defined accuracy and are left out of the mean
    rather than counted as 0, so a split that lacks a class is not penalised for it.
    """
    cm = confusion_matrix(scores.argmax(1), targets, scores.shape[1]).double()
    rows = cm.sum(1)
    present = rows > 0
    return 100.0 * (cm.diagonal()[present] / rows[present]).mean().item()


def average_precision_11point(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """VOC2007 11-point AP of one class: mean over t in {0, 0.1, ..., 1} of the max precision at
    recall >= t (0 when no point reaches t). Thresholds are exactly i/10 (the devkit's
    np.arange(0, 1.1, 0.1) makes 0.3 slightly above 3/10); a class without positives scores 0."""
    labels = labels.bool()
    npos = int(labels.sum())
    if npos == 0:
        return 0.0
    order = torch.argsort(scores.double(), descending=True, stable=True)
    tp = torch.cumsum(labels[order].double(), 0)
    precision = tp / torch.arange(1, len(tp) + 1, dtype=torch.float64)
    recall = tp / npos
    total = 0.0
    for i in range(11):
        reached = recall >= i / 10
        total += precision[reached].max().item() if reached.any() else 0.0
    return 100.0 * total / 11


def mean_average_precision_11point(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes (columns) of the 11-point AP."""
    aps = [average_precision_11point(scores[:, k], labels[:, k]) for k in range(scores.shape[1])]
    return sum(aps) / len(aps)


METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "acc": accuracy,
    "mean_per_class_acc": mean_per_class_accuracy,
    "map11": mean_average_precision_11point,
}
