"""Semantic segmentation metrics, as mmseg's ``IoUMetric`` computes them.

A confusion matrix is accumulated over all images (pixels whose ground truth is
``ignore_index`` are skipped); per class ``IoU = TP / (TP + FP + FN)`` and
``Acc = TP / (TP + FN)``. As in mmseg, a class that is neither in the ground truth nor
predicted gets ``nan`` IoU (a class predicted but absent from the ground truth gets 0), a class
with no ground-truth pixel gets ``nan`` accuracy, and the means skip ``nan`` (``nanmean``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SegmentationScores:
    iou: np.ndarray  # C, nan where the class is neither in the ground truth nor predicted
    accuracy: np.ndarray  # C
    pixel_accuracy: float

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou)) if np.isfinite(self.iou).any() else float("nan")

    @property
    def macc(self) -> float:
        return float(np.nanmean(self.accuracy)) if np.isfinite(self.accuracy).any() else float("nan")


class ConfusionMatrix:
    """Accumulates ``[C, C]`` counts: rows ground truth, columns prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes <= 0:
            raise ValueError("num_classes must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes), np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: ``prediction`` and ``truth`` are ``[H, W]`` integer label maps."""
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
        keep = truth != self.ignore_index
        t = truth[keep].astype(np.int64)
        p = prediction[keep].astype(np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise ValueError(f"ground-truth labels must lie in [0, {self.num_classes}) or be ignored")
        if p.size and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(f"predicted labels must lie in [0, {self.num_classes})")
        self.counts += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def scores(self) -> SegmentationScores:
        tp = np.diag(self.counts).astype(np.float64)
        gt = self.counts.sum(axis=1).astype(np.float64)
        pred = self.counts.sum(axis=0).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            union = gt + pred - tp
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = gt.sum()
        return SegmentationScores(iou, acc, float(tp.sum() / total) if total else float("nan"))
