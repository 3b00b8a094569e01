"""CLIPtrase's cluster vote: DBSCAN on patch affinities, then each cluster takes the
majority label of its pixels (Shao et al., "Explore the Potential of CLIP for Training-Free
Open Vocabulary Semantic Segmentation", ECCV 2024, §3.3, as in leaves162/CLIPtrase
``clip_self_correlation.py``).

The official code calls scikit-learn's ``DBSCAN`` and scipy's ``median_filter``; both are
written here in torch so the core package needs neither (the tests check them against the two
libraries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (eps, min_samples) of the official code at 224 px (14×14 patches) and 336 px (21×21)
OFFICIAL_DBSCAN = {196: (0.7, 3), 441: (1.1, 7)}


def default_dbscan_params(num_patches: int) -> tuple[float, int]:
    """The official ``(eps, min_samples)`` whose patch count is nearest to ``num_patches``."""
    nearest = min(OFFICIAL_DBSCAN, key=lambda n: abs(n - num_patches))
    return OFFICIAL_DBSCAN[nearest]


def dbscan(points: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN (Ester et al., KDD 1996) with scikit-learn's labelling, on ``[n, d]`` points.

    A point is a core point if at least ``min_samples`` points (itself included) lie within
    Euclidean distance ``eps`` (inclusive). Clusters are the connected components of core
    points, numbered in order of their first core point; a non-core point within ``eps`` of a
    core point joins the lowest-numbered such cluster (the order in which scikit-learn's
    expansion reaches it); the rest are noise, ``-1``.

    Returns:
        ``[n]`` int64 cluster ids in ``-1, 0, 1, …``.
    """
    n = points.shape[0]
    near = torch.cdist(points.double(), points.double()) <= eps  # n, n
    core = near.sum(dim=1) >= min_samples  # n
    core_links = near & core[:, None] & core[None, :]  # n, n
    # connected components of the core graph: propagate the minimum index to a fixed point
    component = torch.where(core, torch.arange(n), torch.full((n,), n))
    while True:
        candidates = torch.where(core_links, component[None, :], n).amin(dim=1)
        updated = torch.minimum(component, candidates)
        if torch.equal(updated, component):
            break
        component = updated
    roots = torch.unique(component[core])  # sorted first-core indices = cluster order
    labels = torch.full((n,), -1, dtype=torch.int64)
    for cluster_id, root in enumerate(roots.tolist()):
        labels[component == root] = cluster_id
    border = ~core & (near & core[None, :]).any(dim=1)
    for index in torch.nonzero(border).flatten().tolist():
        labels[index] = labels[near[index] & core].min()
    return labels


def median_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``size × size`` median of each map ``[K, H, W]``, edges extended by mirror reflection
    that repeats the edge (``d c b a | a b c d``; scipy ``median_filter``'s default
    ``mode='reflect'``). ``size`` must be odd."""
    if size % 2 != 1:
        raise ValueError(f"median filter size must be odd, got {size}")
    r = size // 2
    H, W = maps.shape[-2:]
    rows = _symmetric_index(H, r, maps.device)
    cols = _symmetric_index(W, r, maps.device)
    padded = maps[:, rows][:, :, cols]  # K, H+2r, W+2r
    patches = padded.unfold(1, size, 1).unfold(2, size, 1)  # K, H, W, size, size
    return patches.reshape(*patches.shape[:3], -1).median(dim=-1).values


def _symmetric_index(n: int, r: int, device) -> torch.Tensor:
    """Indices ``-r … n+r-1`` folded back into ``0 … n-1`` by symmetric reflection."""
    index = torch.arange(-r, n + r, device=device)
    period = 2 * n
    index = torch.remainder(index, period)
    return torch.where(index >= n, period - 1 - index, index)


def cluster_vote(
    affinity: torch.Tensor,
    grid: tuple[int, int],
    labels: torch.Tensor,
    eps: float,
    min_samples: int,
    upsample: int = 4,
    canvas: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Relabel each DBSCAN cluster of patches with the majority label of its pixels.

    Args:
        affinity: ``[h·w, h·w]`` patch affinities (rows are the points clustered), already
            denoised (CLIPtrase: block-11 affinity minus the class token's row, clamped ≥ 0).
        grid: ``(h, w)`` the patch grid.
        labels: ``[H, W]`` int64 per-pixel labels to vote with.
        eps, min_samples: DBSCAN parameters.
        upsample: the cluster maps are smoothed at ``upsample ×`` the grid by a median filter
            of size ``2·upsample − 1`` (official: 4 and 7).
        canvas: ``(height, width, top, left)``: resize the maps to ``height × width`` and take
            the labels' region at ``(top, left)`` (when the grid covers a padded image);
            ``None``: the grid covers exactly the labels.
    Returns:
        ``[H, W]`` labels. Every pixel belongs to the cluster whose smoothed map is highest
        there; if DBSCAN finds no cluster, ``labels`` is returned unchanged.
    """
    h, w = grid
    ids = dbscan(affinity.float().cpu(), eps, min_samples).to(affinity.device)  # hw
    found = torch.unique(ids[ids >= 0])
    if found.numel() == 0:
        return labels
    maps = torch.stack([affinity[ids == c].float().mean(dim=0) for c in found.tolist()])  # K, hw
    maps = maps.reshape(-1, h, w)
    maps = F.interpolate(maps[None], size=(upsample * h, upsample * w), mode="bilinear",
                         align_corners=False)[0]  # K, 4h, 4w
    maps = median_filter(maps, 2 * upsample - 1)
    height, width, top, left = canvas or (*labels.shape, 0, 0)
    maps = F.interpolate(maps[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    maps = maps[:, top:top + labels.shape[0], left:left + labels.shape[1]]  # K, H, W
    owner = maps.argmax(dim=0)  # H, W: the cluster each pixel belongs to
    voted = labels.clone()
    for k in range(maps.shape[0]):
        inside = owner == k
        values, counts = torch.unique(labels[inside], return_counts=True)
        if counts.numel():
            voted[inside] = values[counts.argmax()]
    return voted
