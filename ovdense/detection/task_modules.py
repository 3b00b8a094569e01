"""mmdet's task modules used at test time: the anchor generator and the delta box coder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ovdense.detection.config import check_keys, unsupported
from ovdense.errors import OvdenseError


class AnchorGenerator:
    """mmdet ``models/task_modules/prior_generators/anchor_generator.py`` ``AnchorGenerator``:
    base anchors ``center ± 0.5·(w, h)`` with ``h_ratio = √ratio``, ``w_ratio = 1/h_ratio``, scale
    major, centre ``center_offset · base_size`` (0: the cell's top-left corner, mmdet's default);
    shifted by ``stride · (x, y)`` over the grid, row-major, every base anchor at each cell
    (``[h·w·A, 4]``). (torchvision's detection ``AnchorGenerator`` rounds its base anchors to whole
    pixels: other boxes.)"""

    def __init__(self, strides: Sequence, ratios: Sequence[float], scales: Sequence[float] | None = None,
                 base_sizes: Sequence[int] | None = None, scale_major: bool = True,
                 octave_base_scale=None, scales_per_octave=None, centers=None, center_offset: float = 0.0,
                 **rest):
        check_keys("AnchorGenerator", rest, {"use_box_type"})
        if centers is not None:
            raise unsupported("AnchorGenerator centers")
        self.strides = [(s, s) if isinstance(s, (int, float)) else tuple(s) for s in strides]
        self.base_sizes = [min(s) for s in self.strides] if base_sizes is None else list(base_sizes)
        if scales is not None:
            self.scales = torch.Tensor(scales)
        elif octave_base_scale is not None and scales_per_octave is not None:
            octave = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
            self.scales = torch.Tensor(octave * octave_base_scale)
        else:
            raise OvdenseError("AnchorGenerator needs scales or octave_base_scale with scales_per_octave")
        self.ratios = torch.Tensor(ratios)
        self.scale_major, self.center_offset = scale_major, center_offset
        self.base_anchors = [self._base(size) for size in self.base_sizes]

    @property
    def num_base_priors(self) -> int:
        return int(self.base_anchors[0].size(0))

    def _base(self, base_size) -> torch.Tensor:
        w = h = base_size
        x_center, y_center = self.center_offset * w, self.center_offset * h
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (w * w_ratios[:, None] * self.scales[None, :]).view(-1)  # A
            hs = (h * h_ratios[:, None] * self.scales[None, :]).view(-1)  # A
        else:
            ws = (w * self.scales[:, None] * w_ratios[None, :]).view(-1)
            hs = (h * self.scales[:, None] * h_ratios[None, :]).view(-1)
        corners = [x_center - 0.5 * ws, y_center - 0.5 * hs, x_center + 0.5 * ws, y_center + 0.5 * hs]
        return torch.stack(corners, dim=-1)  # A, 4

    def grid_priors(self, sizes: Sequence[tuple[int, int]], dtype, device) -> list[torch.Tensor]:
        out = []
        for level, (feat_h, feat_w) in enumerate(sizes):
            base = self.base_anchors[level].to(device).to(dtype)  # A, 4
            stride_w, stride_h = self.strides[level]
            shift_x = torch.arange(0, feat_w, device=device).to(dtype) * stride_w  # w
            shift_y = torch.arange(0, feat_h, device=device).to(dtype) * stride_h  # h
            xx = shift_x.repeat(shift_y.shape[0])  # h·w (row-major)
            yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)  # h·w
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)  # h·w, 4
            out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))  # h·w·A, 4
        return out


class DeltaXYWHBBoxCoder:
    """mmdet ``models/task_modules/coders/delta_xywh_bbox_coder.py`` ``delta2bbox``: denormalise
    ``d·std + mean``, centre ``(x1+x2)/2 + w·dx``, size ``w·exp(clamp(dw, ±|log(wh_ratio_clip)|))``
    (``wh_ratio_clip`` 16/1000), corners ``centre ± size/2``, clipped to ``[0, W] × [0, H]`` of
    ``max_shape = img_shape`` (the resized image, not the padded batch) when ``clip_border``, by
    ``torchvision.ops.clip_boxes_to_image`` (the same clamp). (torchvision's detection box coder
    divides by weights instead of multiplying by stds and clamps ``dw`` from above only.)"""

    def __init__(self, target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(1.0, 1.0, 1.0, 1.0),
                 clip_border: bool = True, add_ctr_clamp: bool = False, ctr_clamp: int = 32, **rest):
        check_keys("DeltaXYWHBBoxCoder", rest, {"use_box_type"})
        self.means, self.stds = list(target_means), list(target_stds)
        self.clip_border, self.add_ctr_clamp, self.ctr_clamp = clip_border, add_ctr_clamp, ctr_clamp

    def decode(self, rois: torch.Tensor, deltas: torch.Tensor, max_shape=None,
               wh_ratio_clip: float = 16 / 1000) -> torch.Tensor:
        """``rois [N, 4]``, ``deltas [N, 4·k]`` → boxes ``[N, 4·k]``."""
        num_bboxes, num_classes = deltas.size(0), deltas.size(1) // 4
        if num_bboxes == 0:
            return deltas
        deltas = deltas.reshape(-1, 4)  # N·k, 4
        means = deltas.new_tensor(self.means).view(1, -1)
        stds = deltas.new_tensor(self.stds).view(1, -1)
        denorm = deltas * stds + means
        dxy, dwh = denorm[:, :2], denorm[:, 2:]
        rois_ = rois.repeat(1, num_classes).reshape(-1, 4)  # N·k, 4
        pxy = (rois_[:, :2] + rois_[:, 2:]) * 0.5
        pwh = rois_[:, 2:] - rois_[:, :2]
        dxy_wh = pwh * dxy
        max_ratio = np.abs(np.log(wh_ratio_clip))
        if self.add_ctr_clamp:
            dxy_wh = torch.clamp(dxy_wh, max=self.ctr_clamp, min=-self.ctr_clamp)
            dwh = torch.clamp(dwh, max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        bboxes = torch.cat([gxy - (gwh * 0.5), gxy + (gwh * 0.5)], dim=-1)  # N·k, 4
        if self.clip_border and max_shape is not None:
            from torchvision.ops import clip_boxes_to_image  # mmdet's clamp_ to [0, W] × [0, H]

            bboxes = clip_boxes_to_image(bboxes, tuple(max_shape[:2]))  # N·k, 4
        return bboxes.reshape(num_bboxes, -1)  # N, 4·k

