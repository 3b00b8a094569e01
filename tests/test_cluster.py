"""CLIPtrase's cluster vote: DBSCAN and the median filter against scikit-learn and scipy."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.cluster import DBSCAN

from ovdense.refine.cluster import cluster_vote, dbscan, default_dbscan_params, median_filter


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("eps, min_samples", [(0.5, 3), (0.8, 5), (0.3, 2)])
def test_dbscan_matches_scikit_learn(seed, eps, min_samples):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(4, 5))
    points = np.concatenate([c + rng.normal(0, 0.4, size=(30, 5)) for c in centres])
    points = np.concatenate([points, rng.uniform(-6, 6, size=(20, 5))])  # noise
    points = points[rng.permutation(len(points))]
    want = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(points)
    got = dbscan(torch.from_numpy(points), eps, min_samples).numpy()
    np.testing.assert_array_equal(got, want)


def test_dbscan_all_noise():
    points = torch.arange(5, dtype=torch.float32).view(5, 1) * 10
    assert dbscan(points, 1.0, 2).tolist() == [-1] * 5


@pytest.mark.parametrize("size", [3, 7])
def test_median_filter_matches_scipy(size, rng):
    maps = rng.normal(size=(3, 9, 13)).astype(np.float32)
    want = np.stack([ndimage.median_filter(m, size=size) for m in maps])
    np.testing.assert_array_equal(median_filter(torch.from_numpy(maps), size).numpy(), want)


def test_cluster_vote_gives_each_cluster_its_majority_label():
    h, w = 4, 6
    region = torch.zeros(h, w, dtype=torch.long)
    region[:, 3:] = 1  # two patch clusters: left and right halves
    flat = region.flatten()
    affinity = (flat[:, None] == flat[None, :]).float()  # hw, hw: 1 inside a cluster
    labels = torch.full((16, 24), 2)
    labels[:, 12:] = 5
    noisy = labels.clone()
    noisy[3:6, 2:4] = 7  # minority labels inside each cluster are voted away
    noisy[10, 20] = 1
    voted = cluster_vote(affinity, (h, w), noisy, eps=0.5, min_samples=3)
    torch.testing.assert_close(voted, labels)


def test_cluster_vote_without_clusters_keeps_labels():
    affinity = torch.eye(6)  # every point alone
    labels = torch.arange(12).view(3, 4)
    assert torch.equal(cluster_vote(affinity, (2, 3), labels, eps=0.5, min_samples=2), labels)


def test_default_dbscan_params_are_the_official_pairs():
    assert default_dbscan_params(14 * 14) == (0.7, 3)
    assert default_dbscan_params(21 * 21) == (1.1, 7)


def test_cluster_vote_on_a_padded_canvas_uses_the_labels_region():
    h, w = 4, 6
    region = torch.zeros(h, w, dtype=torch.long)
    region[:, 3:] = 1  # clusters split the 24-pixel-wide canvas at x = 12
    flat = region.flatten()
    affinity = (flat[:, None] == flat[None, :]).float()
    labels = torch.full((16, 16), 3)  # the labels cover canvas columns 4..19
    labels[:, 8:] = 4  # their own split at x = 8 is canvas x = 12
    noisy = labels.clone()
    noisy[0:5, 0:3] = 9
    voted = cluster_vote(affinity, (h, w), noisy, eps=0.5, min_samples=3, canvas=(16, 24, 0, 4))
    torch.testing.assert_close(voted, labels)
