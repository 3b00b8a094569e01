"""Anomaly metrics: image AUROC, AP and F1-max; pixel AUROC, AP, F1-max and AUPRO@30 %.

Image-level scores are few and kept exactly. Pixel-level scores are streamed into histograms
over ``[low, high]`` (``bins`` equal bins; scores outside are clipped), so a dataset's maps are
never held at once; metrics computed from the histograms equal the exact ones when no two
different scores share a bin, and differ by at most the mass of shared bins otherwise.

* AUROC: area under the ROC curve (the probability that an anomalous sample scores above a
  normal one, ties counting ½).
* AP: average precision, ``Σ (R_i − R_{i−1}) · P_i`` over decreasing thresholds (as
  scikit-learn's ``average_precision_score``).
* F1-max: the best F1 over all thresholds.
* AUPRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, §4.2): for each
  threshold, PRO is the mean over ground-truth connected regions (8-connectivity) of the
  fraction of the region above it; the PRO–FPR curve is integrated up to FPR = 0.3 (the last
  segment interpolated linearly) and divided by 0.3. This is what ``AnomalyMetrics`` and
  ``ovdense anomaly-eval`` report.
* ``aupro_fixed_steps``: the approximation the zero-shot anomaly repositories report (AnomalyCLIP's
  and its successors' ``cal_pro_score``, after cflow-ad): 200 thresholds evenly spaced over the maps'
  range, the FPRs below 0.3 rescaled to [0, 1] by their own minimum and maximum before the area.
  Its figures are not comparable with the exact AUPRO's; compare each table with its own kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def _curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives for thresholds from the highest bin down."""
    tp = np.concatenate([[0], np.cumsum(pos[::-1])]).astype(np.float64)
    fp = np.concatenate([[0], np.cumsum(neg[::-1])]).astype(np.float64)
    return tp, fp


def auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from per-bin counts of positives and negatives (bins in increasing score order)."""
    tp, fp = _curve(pos, neg)
    if tp[-1] == 0 or fp[-1] == 0:
        return float("nan")
    return float(np.trapezoid(tp / tp[-1], fp / fp[-1]))


def ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    tp, fp = _curve(pos, neg)
    if tp[-1] == 0:
        return float("nan")
    keep = np.concatenate([[False], (pos[::-1] + neg[::-1]) > 0])  # thresholds at occupied bins
    recall = tp / tp[-1]
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    steps = np.diff(recall, prepend=0.0)
    return float(np.sum(steps[keep] * precision[keep]))


def f1_max_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    tp, fp = _curve(pos, neg)
    if tp[-1] == 0:
        return float("nan")
    fn = tp[-1] - tp
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(f1.max())


def _exact_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct score (increasing), the count of positives and negatives."""
    values, inverse = np.unique(scores, return_inverse=True)
    pos = np.bincount(inverse, weights=labels.astype(np.float64), minlength=len(values))
    neg = np.bincount(inverse, weights=1.0 - labels.astype(np.float64), minlength=len(values))
    return pos, neg


def aupro_fixed_steps(maps, masks, steps: int = 200, max_fpr: float = 0.3) -> float:
    """AUPRO as the zero-shot anomaly repositories compute it (``cal_pro_score`` of AnomalyCLIP and the
    methods that reuse its evaluation, from cflow-ad's ``train.py``), on all maps at once.

    The thresholds are ``min + k · (max − min) / steps`` for ``k = 0 … steps − 1`` over every map's
    values; at each, a pixel is positive when its score is *above* the threshold. PRO is the mean, over
    every ground-truth region (8-connected, of every image), of the fraction of the region's pixels
    that are positive; FPR is the fraction of normal pixels that are positive. The points with
    FPR < ``max_fpr`` are kept, their FPRs rescaled to ``[0, 1]`` by their own minimum and maximum, and
    the area under PRO over them is the trapezoid rule's. (The exact AUPRO, ``AnomalyMetrics``, instead
    thresholds at every score and divides the area up to ``max_fpr`` by ``max_fpr``.)

    Args:
        maps: anomaly maps, each ``[H, W]`` (a list, or an array ``[N, H, W]``).
        masks: their ground truth, the same shapes, non-zero = defect.
    """
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(k) > 0 for k in masks]
    if len(maps) != len(masks) or any(m.shape != k.shape for m, k in zip(maps, masks)):
        raise ValueError("aupro_fixed_steps needs one mask of its map's size per map")
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    normal = sum(int((~k).sum()) for k in masks)
    regions = []  # (image index, flat indices of the region's pixels)
    for index, mask in enumerate(masks):
        count, labelled = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [(index, np.flatnonzero(labelled == r)) for r in range(1, count)]
    if not regions or normal == 0 or high <= low:
        return float("nan")
    pros, fprs = [], []
    for threshold in np.arange(low, high, (high - low) / steps):
        above = [m > threshold for m in maps]
        pros.append(np.mean([above[i].ravel()[pixels].mean() for i, pixels in regions]))
        fprs.append(sum(int((a & ~k).sum()) for a, k in zip(above, masks)) / normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < max_fpr
    if keep.sum() < 2:
        return float("nan")
    x = fprs[keep]
    x = (x - x.min()) / (x.max() - x.min())
    return float(abs(np.trapezoid(pros[keep], x)))  # FPR falls as the threshold rises: monotonic


@dataclass
class AnomalyScores:
    image_auroc: float
    image_ap: float
    image_f1_max: float
    pixel_auroc: float
    pixel_ap: float
    pixel_f1_max: float
    aupro: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class AnomalyMetrics:
    """Accumulate ``(image score, label, pixel map, mask)`` per image; read ``scores()``."""

    def __init__(self, bins: int = 1 << 16, value_range: tuple[float, float] = (0.0, 1.0),
                 pro_bins: int = 1 << 12, max_fpr: float = 0.3):
        self.bins, self.low, self.high = bins, float(value_range[0]), float(value_range[1])
        self.pro_bins, self.max_fpr = pro_bins, max_fpr
        self.image_scores: list[float] = []
        self.image_labels: list[int] = []
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)
        self.pro_neg = np.zeros(pro_bins, np.int64)
        self.regions: list[np.ndarray] = []  # per region: its histogram over pro_bins, normalised

    def _bin(self, values: np.ndarray, bins: int) -> np.ndarray:
        scaled = (values.astype(np.float64) - self.low) / (self.high - self.low) * bins
        return np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)

    def update(self, score: float, label: int, anomaly_map: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> None:
        """Add one image. ``anomaly_map`` and ``mask`` (``[H, W]``, mask > 0 = defect) must have
        the same size; pass neither for image-level metrics only."""
        self.image_scores.append(float(score))
        self.image_labels.append(int(bool(label)))
        if anomaly_map is None:
            return
        if mask is None:
            mask = np.zeros(anomaly_map.shape, bool)
        if mask.shape != anomaly_map.shape:
            raise ValueError(f"the mask is {mask.shape} but the anomaly map is {anomaly_map.shape}")
        defect = mask > 0
        fine = self._bin(anomaly_map, self.bins)
        self.pos += np.bincount(fine[defect], minlength=self.bins)
        self.neg += np.bincount(fine[~defect], minlength=self.bins)
        coarse = self._bin(anomaly_map, self.pro_bins)
        self.pro_neg += np.bincount(coarse[~defect], minlength=self.pro_bins)
        if defect.any():
            count, regions = cv2.connectedComponents(defect.astype(np.uint8), connectivity=8)
            for region in range(1, count):
                inside = coarse[regions == region]
                self.regions.append(np.bincount(inside, minlength=self.pro_bins) / inside.size)

    def aupro(self) -> float:
        if not self.regions or self.pro_neg.sum() == 0:
            return float("nan")
        regions = np.stack(self.regions)  # R, bins
        # thresholds from the highest bin down: fraction of each region / of normal pixels above
        pro = np.concatenate([[0.0], np.cumsum(regions[:, ::-1], axis=1).mean(axis=0)])
        fpr = np.concatenate([[0], np.cumsum(self.pro_neg[::-1])]) / self.pro_neg.sum()
        cut = np.searchsorted(fpr, self.max_fpr, side="right")
        x, y = fpr[:cut], pro[:cut]
        if cut < len(fpr):  # interpolate the segment that crosses max_fpr
            x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
            y_end = y0 + (y1 - y0) * (self.max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
            x, y = np.append(x, self.max_fpr), np.append(y, y_end)
        return float(np.trapezoid(y, x) / self.max_fpr)

    def scores(self) -> AnomalyScores:
        labels = np.array(self.image_labels)
        pos, neg = _exact_counts(np.array(self.image_scores), labels)
        return AnomalyScores(
            image_auroc=auroc_from_counts(pos, neg),
            image_ap=ap_from_counts(pos, neg),
            image_f1_max=f1_max_from_counts(pos, neg),
            pixel_auroc=auroc_from_counts(self.pos, self.neg),
            pixel_ap=ap_from_counts(self.pos, self.neg),
            pixel_f1_max=f1_max_from_counts(self.pos, self.neg),
            aupro=self.aupro(),
        )
