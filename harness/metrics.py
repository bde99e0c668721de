"""Dataset-level segmentation metrics from one streaming confusion matrix
(shared/reference/segmenter.md §4), with each source's bookkeeping (``BOOKKEEPING``)."""
from __future__ import annotations

import numpy as np
import torch


# How the per-class figures enter the means:
# "mmseg": MMSegmentation's IoUMetric (the reference evaluates with it too): a class with union 0
#   has IoU NaN, a class with no labelled pixel has Acc (= recall, I / label) NaN; both are left
#   out of mIoU and mAcc.
# "paddlevit": PaddleViT's src/utils/metrics.py: union 0 gives IoU 0, kept in the mean; per-class
#   Acc is I / predicted (precision), 0 where nothing was predicted.
BOOKKEEPING = ("mmseg", "paddlevit")


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

    def compute(self, bookkeeping: str = "mmseg") -> dict:
        """``mIoU``, ``mAcc``, ``aAcc`` in percent and per-class ``IoU`` and ``Acc``, kept as
        ``bookkeeping`` says (see BOOKKEEPING). aAcc = sum I / labelled pixels either way
        (PaddleViT's "Acc" divides by predicted labelled pixels: the same number)."""
        if bookkeeping not in BOOKKEEPING:
            raise ValueError(f"bookkeeping must be one of {BOOKKEEPING}, got {bookkeeping!r}")
        mat = self.mat.double().numpy()
        inter = np.diag(mat)
        labelled = mat.sum(axis=1)
        predicted = mat.sum(axis=0)
        union = labelled + predicted - inter
        empty = 0.0 if bookkeeping == "paddlevit" else np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, empty)
            if bookkeeping == "paddlevit":
                acc = np.where(predicted > 0, inter / predicted, 0.0)
            else:
                acc = np.where(labelled > 0, inter / labelled, np.nan)
        total = labelled.sum()
        return {
            "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
            "aAcc": float(inter.sum() / total * 100) if total else float("nan"),
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        }
