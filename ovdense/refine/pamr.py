"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, "Single-Stage Semantic
Segmentation from Image Labels", CVPR 2020, §3.3, Eq. 5–6).

For every pixel ``i`` and each of its 8 neighbours ``j`` at every dilation ``d``, the image
gives a local affinity

    κ(i, j) = − |I_i − I_j| / (1e-8 + 0.1 · σ_i),      σ_i the std of I over i's neighbourhood

averaged over the image channels and normalised by a softmax over the neighbours ``j``; the
class maps are then propagated ``num_iter`` times: ``m_i ← Σ_j softmax_j(κ(i, j)) · m_j``.

As in the reference implementation used by NACLIP and SCLIP: neighbours are read with
replicate padding, σ_i is the unbiased std over the 9·len(dilations) values of the 3×3
dilated neighbourhoods (centre included), and the mask is first resized bilinearly
(``align_corners=True``) to the image's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# (dy, dx) of the 8 neighbours in a 3x3 window, row by row, centre excluded
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shifted(x: torch.Tensor, offsets: Sequence[tuple[int, int]], dilation: int) -> torch.Tensor:
    """Values of ``x[B, K, H, W]`` at each offset × dilation (replicate padding): ``[B, K, P, H, W]``."""
    H, W = x.shape[-2:]
    d = dilation
    padded = F.pad(x, (d, d, d, d), mode="replicate")
    views = [padded[:, :, d + dy * d: d + dy * d + H, d + dx * d: d + dx * d + W] for dy, dx in offsets]
    return torch.stack(views, dim=2)


def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    dilations: Sequence[int] = (8, 16),
    num_iter: int = 10,
) -> torch.Tensor:
    """Refine class maps with image-adaptive affinities.

    Args:
        image: ``[B, K, H, W]`` float (the normalised image; ``K`` channels).
        masks: ``[B, C, h, w]`` class maps (logits or probabilities), resized to ``H × W``.
        dilations: neighbourhood dilations in pixels.
        num_iter: propagation steps.
    Returns:
        ``[B, C, H, W]`` refined maps.
    """
    image = image.float()
    masks = F.interpolate(masks.float(), size=image.shape[-2:], mode="bilinear", align_corners=True)
    centre = [(0, 0)] + _NEIGHBOURS
    window = torch.cat([_shifted(image, centre, d) for d in dilations], dim=2)  # B, K, 9L, H, W
    sigma = window.std(dim=2, keepdim=True)  # B, K, 1, H, W
    neighbours = torch.cat([_shifted(image, _NEIGHBOURS, d) for d in dilations], dim=2)  # B, K, 8L, H, W
    kappa = -(image.unsqueeze(2) - neighbours).abs() / (1e-8 + 0.1 * sigma)  # B, K, 8L, H, W
    affinity = F.softmax(kappa.mean(dim=1, keepdim=True), dim=2)  # B, 1, 8L, H, W
    offsets = [(d, off) for d in dilations for off in _NEIGHBOURS]  # 8L, in affinity's order
    for _ in range(num_iter):
        # one neighbour at a time keeps memory at O(C·H·W) instead of O(8L·C·H·W)
        refined = torch.zeros_like(masks)
        for index, (d, off) in enumerate(offsets):
            refined += _shifted(masks, [off], d)[:, :, 0] * affinity[:, :, index]
        masks = refined  # B, C, H, W
    return masks
