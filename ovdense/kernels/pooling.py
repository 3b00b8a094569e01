"""Pooling dense features over masks (SAM proposals) and boxes (detection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_pool(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Area-weighted mean of ``features [B, D, h, w]`` inside each of ``masks [B, M, H, W]``.

    Each mask is reduced to the feature grid by its mean over each cell's pixels (adaptive
    average pooling, ``F.interpolate(mode="area")``: the fraction of the cell it covers when
    ``H, W`` are multiples of ``h, w``), and all masks are pooled in one batched matmul.

    Returns:
        ``pooled [B, M, D]`` (float32) and ``valid [B, M]`` (bool). A mask that covers no area
        is not valid and pools to zeros, never NaN.
    """
    if features.dim() != 4 or masks.dim() != 4 or features.shape[0] != masks.shape[0]:
        raise ValueError(f"features [B, D, h, w] and masks [B, M, H, W] expected, got "
                         f"{tuple(features.shape)} and {tuple(masks.shape)}")
    B, D, h, w = features.shape
    M = masks.shape[1]
    if M == 0:
        return features.new_zeros(B, 0, D, dtype=torch.float32), torch.zeros(B, 0, dtype=torch.bool)
    weights = F.interpolate(masks.float(), size=(h, w), mode="area").reshape(B, M, h * w)  # B, M, hw
    area = weights.sum(dim=2, keepdim=True)  # B, M, 1
    pooled = torch.bmm(weights, features.float().reshape(B, D, h * w).transpose(1, 2))  # B, M, D
    valid = area[..., 0] > 0
    return torch.where(valid[..., None], pooled / area.clamp(min=1e-12), 0.0), valid


def roi_pool(
    features: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    output_size: int = 7,
) -> torch.Tensor:
    """Box features from ``features [B, D, h, w]`` with torchvision's ``roi_align``.

    Args:
        boxes: ``[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in image pixels.
        image_size: ``(H, W)`` of the image the boxes refer to.
    Returns:
        ``[K, D, output_size, output_size]`` (``aligned=True``, adaptive sampling).
    """
    from torchvision.ops import roi_align

    h, w = features.shape[-2:]
    H, W = image_size
    if abs(h / H - w / W) > 1e-6 * max(h / H, w / W) + 1e-9:
        raise ValueError(f"features {h}x{w} and image {H}x{W} have different aspect ratios")
    return roi_align(features.float(), boxes.float(), output_size=output_size,
                     spatial_scale=h / H, sampling_ratio=-1, aligned=True)
