"""Dataset-level segmentation metrics from one streaming confusion matrix
(shared/reference/segmenter.md §4; MMSegmentation's ``IoUMetric`` semantics)."""
from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """int64 matrix ``[label, prediction]`` summed over every pixel of a split.

    Memory is O(num_classes^2) whatever the split size; shards accumulate their own
    matrices and ``merge`` them once.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        pred, label = torch.as_tensor(pred), torch.as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
        pred, label = pred.reshape(-1).long().cpu(), label.reshape(-1).long().cpu()
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        if len(label) and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(f"label values must lie in 0..{self.num_classes - 1} or be {self.ignore_index}")
        if len(pred) and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted classes must lie in 0..{self.num_classes - 1}")
        n = self.num_classes
        self.mat += torch.bincount(label * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.mat += other.mat
        return self

    def compute(self) -> dict:
        """``mIoU``, ``mAcc``, ``aAcc`` in percent; per-class ``IoU`` and ``Acc`` (NaN where
        the class has union 0, resp. no labelled pixel, and left out of the means)."""
        mat = self.mat.double().numpy()
        inter = np.diag(mat)
        labelled = mat.sum(axis=1)
        union = labelled + mat.sum(axis=0) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, np.nan)
            acc = np.where(labelled > 0, inter / labelled, np.nan)
        total = labelled.sum()
        return {
            "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(inter.sum() / total * 100) if total else float("nan"),
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        }
