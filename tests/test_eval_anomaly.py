"""Anomaly metrics against scikit-learn and a plain AUPRO computation."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ovdense.eval.anomaly import AnomalyMetrics, aupro_fixed_steps

BINS = 256


def quantised(rng, shape):
    """Scores at bin centres, so binned metrics must equal the exact ones."""
    return (rng.integers(0, BINS, size=shape) + 0.5) / BINS


def plain_aupro(maps, masks, max_fpr=0.3):
    """Threshold at every distinct score; PRO over 8-connected regions; integrate to max_fpr."""
    all_scores = np.concatenate([m.ravel() for m in maps])
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    regions = []  # the scores inside each region
    for m, k in zip(maps, masks):
        labelled, count = ndimage.label(k, structure=np.ones((3, 3)))
        regions += [m[labelled == r] for r in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for t in np.unique(all_scores)[::-1]:
        points.append(((normal >= t).mean(), np.mean([(region >= t).mean() for region in regions])))
    fpr, pro = np.array(points).T
    keep = fpr <= max_fpr
    x, y = list(fpr[keep]), list(pro[keep])
    nxt = np.argmax(fpr > max_fpr)
    if fpr[nxt] > max_fpr:
        x0, y0, x1, y1 = fpr[nxt - 1], pro[nxt - 1], fpr[nxt], pro[nxt]
        x.append(max_fpr)
        y.append(y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0))
    return np.trapezoid(y, x) / max_fpr


def f1_max(truth, scores):
    p, r, _ = precision_recall_curve(truth, scores)
    return np.max(2 * p * r / np.maximum(p + r, 1e-12))


def reference_metrics(scores, labels, maps, masks, bins=1 << 16, pro_bins=1 << 12):
    """What ``AnomalyMetrics()`` should report, from scikit-learn and ``plain_aupro``, with the
    pixel scores put in its documented histogram bins (``bins`` over [0, 1] for the pixel
    metrics, ``pro_bins`` for AUPRO; a bin's index stands for its scores)."""
    def binned(count):
        return [np.clip(np.floor(m.astype(np.float64) * count), 0, count - 1) for m in maps]

    truth = np.concatenate([k.ravel() for k in masks])
    pixels = np.concatenate([m.ravel() for m in binned(bins)])
    return {"image_auroc": roc_auc_score(labels, scores), "image_ap": average_precision_score(labels, scores),
            "image_f1_max": f1_max(labels, scores),
            "pixel_auroc": roc_auc_score(truth, pixels), "pixel_ap": average_precision_score(truth, pixels),
            "pixel_f1_max": f1_max(truth, pixels), "aupro": plain_aupro(binned(pro_bins), masks)}


def test_pixel_and_image_metrics_match_references(rng):
    metrics = AnomalyMetrics(bins=BINS, pro_bins=BINS)
    maps, masks, scores, labels = [], [], [], []
    for i in range(6):
        mask = np.zeros((24, 30), bool)
        if i % 2:
            mask[rng.integers(0, 12):, rng.integers(0, 15):rng.integers(16, 30)] = True
            mask[0:3, 0:4] = True  # a second region
        amap = quantised(rng, mask.shape)
        amap[mask] = np.clip(amap[mask] + 0.3, 0, 0.999)
        amap = (np.floor(amap * BINS) + 0.5) / BINS
        score = float(rng.random() + 0.3 * (i % 2))
        metrics.update(score, i % 2, amap, mask)
        maps.append(amap)
        masks.append(mask)
        scores.append(score)
        labels.append(i % 2)
    got = metrics.scores()
    truth = np.concatenate([m.ravel() for m in masks])
    pixels = np.concatenate([m.ravel() for m in maps])
    assert got.pixel_auroc == pytest.approx(roc_auc_score(truth, pixels), abs=1e-12)
    assert got.pixel_ap == pytest.approx(average_precision_score(truth, pixels), abs=1e-12)
    assert got.pixel_f1_max == pytest.approx(f1_max(truth, pixels), abs=1e-12)
    assert got.image_auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got.image_ap == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got.image_f1_max == pytest.approx(f1_max(labels, scores), abs=1e-12)
    assert got.aupro == pytest.approx(plain_aupro(maps, masks), abs=1e-9)


def test_perfect_and_inverted_maps():
    metrics = AnomalyMetrics()
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    metrics.update(0.9, 1, mask.astype(float) * 0.8 + 0.1, mask)
    metrics.update(0.1, 0, np.full((10, 10), 0.1), np.zeros((10, 10), bool))
    s = metrics.scores()
    assert s.pixel_auroc == 1.0 and s.aupro == pytest.approx(1.0) and s.image_auroc == 1.0
    inverted = AnomalyMetrics()
    inverted.update(0.1, 1, 1 - (mask.astype(float) * 0.8 + 0.1), mask)
    assert inverted.scores().pixel_auroc == 0.0


def test_mask_of_another_size_is_an_error():
    with pytest.raises(ValueError, match="mask is"):
        AnomalyMetrics().update(0.5, 1, np.zeros((4, 4)), np.zeros((5, 4), bool))


def fixed_step_pro_reference(masks, amaps, max_step=200, expect_fpr=0.3):
    """The zero-shot repositories' ``cal_pro_score`` (AnomalyCLIP's evaluation, after cflow-ad), written
    out on ``[N, H, W]`` arrays with scipy's 8-connected labelling and scikit-learn's ``auc``."""
    from sklearn.metrics import auc

    binary = np.zeros_like(amaps, dtype=bool)
    low, high = amaps.min(), amaps.max()
    pros, fprs = [], []
    for th in np.arange(low, high, (high - low) / max_step):
        binary[amaps <= th], binary[amaps > th] = 0, 1
        pro = []
        for b, m in zip(binary, masks):
            labelled, count = ndimage.label(m, structure=np.ones((3, 3)))
            pro += [b[labelled == r].sum() / (labelled == r).sum() for r in range(1, count + 1)]
        inverse = 1 - masks
        pros.append(np.mean(pro))
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    x = fprs[keep]
    return auc((x - x.min()) / (x.max() - x.min()), pros[keep])


def test_fixed_step_aupro_is_the_zero_shot_repositories_and_not_the_exact_one(rng):
    """``aupro_fixed_steps`` against the written-out ``cal_pro_score``; on the same maps the exact
    AUPRO (``AnomalyMetrics``) differs, so a table must say which one it reports."""
    maps, masks = [], []
    for i in range(5):
        mask = np.zeros((20, 26), bool)
        if i % 2 == 0:
            mask[rng.integers(0, 10):rng.integers(12, 20), rng.integers(0, 12):rng.integers(14, 26)] = True
            mask[18:, 0:3] = True  # a second region, touching the first only diagonally at most
        amap = rng.random(mask.shape) + 0.6 * mask
        maps.append(amap)
        masks.append(mask)
    maps[1][0, 0] = 12.0  # one far outlier in a normal image: the 200 even steps grow coarse
    got = aupro_fixed_steps(maps, masks)
    want = fixed_step_pro_reference(np.stack(masks).astype(np.uint8), np.stack(maps))
    assert got == pytest.approx(want, abs=1e-12) and 0.2 < got < 1.0
    exact = AnomalyMetrics(pro_bins=1 << 16)
    for amap, mask in zip(maps, masks):
        exact.update(float(amap.max()), int(mask.any()), np.clip(amap / 1.6, 0, 1), mask)
    assert abs(exact.aupro() - got) > 0.01
    with pytest.raises(ValueError, match="one mask of its map's size"):
        aupro_fixed_steps(maps, masks[:-1])
