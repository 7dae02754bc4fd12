"""Segmentation metrics: confusion matrix, per-class IoU, mIoU, and the harmonic mean over domains."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["IGNORE_INDEX", "confusion_matrix", "harmonic_mean", "mean_iou", "per_class_iou"]

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Rows are true classes, columns predicted ones; ``ignore_index`` pixels do not count."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    keep = target != ignore_index
    t = target[keep].to(torch.int64)
    p = pred[keep].to(torch.int64)
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"label value {int(t.max())} is outside 0..{num_classes - 1} (and is not {ignore_index})")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_iou(conf: Tensor) -> Tensor:
    """IoU per class; NaN where a class appears neither in the labels nor in the predictions."""
    conf = conf.to(torch.float64)
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(conf: Tensor) -> float:
    """Mean over the classes that are present in the labels (the usual benchmark rule)."""
    iou = per_class_iou(conf)
    present = conf.sum(1) > 0
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def harmonic_mean(per_domain: Mapping[str, float]) -> float:
    """H over domains: punishes a model that is good on one domain and bad on another."""
    values = list(per_domain.values())
    if not values or any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
