"""PAMR against a per-pixel loop of Araslanov & Roth's equations, and on a blurred edge."""

import numpy as np
import torch
import torch.nn.functional as F

from ovdense.refine.pamr import pamr

OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def naive_pamr(image, mask, dilations, num_iter):
    """One pixel at a time: κ over 8 neighbours × dilations, softmax, propagate."""
    K, H, W = image.shape

    def at(a, y, x):  # replicate padding
        return a[:, min(max(y, 0), H - 1), min(max(x, 0), W - 1)]

    affinity = np.zeros((H, W, 8 * len(dilations)))
    for y in range(H):
        for x in range(W):
            window = [at(image, y + dy * d, x + dx * d) for d in dilations for dy, dx in [(0, 0)] + OFFSETS]
            sigma = np.std(np.stack(window), axis=0, ddof=1)  # K
            kappa = [
                np.mean(-np.abs(image[:, y, x] - at(image, y + dy * d, x + dx * d)) / (1e-8 + 0.1 * sigma))
                for d in dilations for dy, dx in OFFSETS
            ]
            e = np.exp(np.array(kappa) - max(kappa))
            affinity[y, x] = e / e.sum()
    neighbours = [(dy * d, dx * d) for d in dilations for dy, dx in OFFSETS]
    for _ in range(num_iter):
        new = np.zeros_like(mask)
        for y in range(H):
            for x in range(W):
                for n, (oy, ox) in enumerate(neighbours):
                    new[:, y, x] += affinity[y, x, n] * at(mask, y + oy, x + ox)
        mask = new
    return mask


def test_pamr_matches_the_per_pixel_equations(rng):
    image = rng.normal(size=(3, 7, 9))
    mask = rng.random((2, 7, 9))
    want = naive_pamr(image, mask, dilations=(1, 2), num_iter=3)
    got = pamr(torch.from_numpy(image)[None], torch.from_numpy(mask)[None], dilations=(1, 2), num_iter=3)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-4, atol=1e-5)


def test_pamr_sharpens_a_blurred_edge():
    H, W = 48, 64
    truth = torch.zeros(H, W)
    truth[:, 29:] = 1.0  # the object's right part; the edge is not on a coarse-grid line
    noise = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    image = truth.expand(3, H, W)[None] + 0.02 * noise
    coarse = F.avg_pool2d(truth[None, None], 8)  # a low-resolution mask
    blurred = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    masks = torch.cat([1 - blurred, blurred], dim=1)  # 1, 2, H, W
    refined = pamr(image, masks)
    error_before = (masks[0, 1] - truth).abs().mean()
    error_after = (refined[0, 1] - truth).abs().mean()
    assert error_after < 0.5 * error_before, (error_before, error_after)
    assert ((refined[0, 1] > refined[0, 0]).float() == truth).float().mean() > 0.99
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(1, H, W))  # affinities sum to 1
