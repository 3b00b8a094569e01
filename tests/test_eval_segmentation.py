"""mIoU against scikit-learn's confusion matrix and Jaccard score."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, jaccard_score

from ovdense.eval.segmentation import ConfusionMatrix


def test_matches_scikit_learn(rng):
    C = 5
    matrix = ConfusionMatrix(C)
    truths, preds = [], []
    for _ in range(3):
        truth = rng.integers(0, C - 1, size=(12, 9))  # class 4 never in the ground truth
        truth[rng.random(truth.shape) < 0.1] = 255
        pred = np.where(rng.random(truth.shape) < 0.6, truth % 255, rng.integers(0, C, truth.shape))
        pred[truth == 255] = rng.integers(0, C, (truth == 255).sum())
        matrix.update(pred, truth)
        keep = truth != 255
        truths.append(truth[keep])
        preds.append(pred[keep])
    t, p = np.concatenate(truths), np.concatenate(preds)
    np.testing.assert_array_equal(matrix.counts, confusion_matrix(t, p, labels=range(C)))
    scores = matrix.scores()
    want = jaccard_score(t, p, labels=range(C), average=None, zero_division=0)  # unions all > 0
    np.testing.assert_allclose(scores.iou, want)
    assert scores.iou[4] == 0.0  # predicted but never in the ground truth: IoU 0, as in mmseg
    assert np.isnan(scores.accuracy[4])
    assert scores.miou == pytest.approx(np.mean(want))
    assert scores.pixel_accuracy == pytest.approx((t == p).mean())


def test_absent_classes_are_nan_and_skipped():
    matrix = ConfusionMatrix(3)
    matrix.update(np.array([[0, 1]]), np.array([[0, 1]]))
    scores = matrix.scores()
    assert np.isnan(scores.iou[2]) and scores.miou == 1.0


def test_bad_labels():
    matrix = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="ground-truth labels"):
        matrix.update(np.zeros((1, 2), int), np.array([[0, 7]]))
    with pytest.raises(ValueError, match="differ in shape"):
        matrix.update(np.zeros((1, 2), int), np.zeros((2, 1), int))
