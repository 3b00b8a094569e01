"""mmdet's RoI heads at test time: the multi-level RoI extractor, the conv/FC box head and the FCN
mask head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.detection.config import check_keys, unsupported
from ovdense.detection.necks import ConvModule
from ovdense.detection.ops import paste_masks, roi_align
from ovdense.detection.task_modules import DeltaXYWHBBoxCoder
from ovdense.errors import OvdenseError


class SingleRoIExtractor(nn.Module):
    """mmdet ``models/roi_heads/roi_extractors/single_level_roi_extractor.py``: each RoI goes to level
    ``clamp(⌊log2(√(w·h) / finest_scale + 1e-6)⌋, 0, L−1)`` and is pooled there by RoIAlign with
    ``spatial_scale = 1 / featmap_stride``. mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``
    (``ops/roi_align.py``) computes what ``torchvision.ops.roi_align(aligned=True)`` does (the same
    detectron2 kernel; ``tests/test_detector_plain.py`` checks it), so torchvision's op is used.
    torchvision's ``MultiScaleRoIAlign`` maps boxes to levels by another rule (canonical 224 px at
    level 4, scales inferred from the map sizes), so the mapping stays mmdet's."""

    def __init__(self, roi_layer: dict, out_channels: int, featmap_strides: Sequence[int],
                 finest_scale: int = 56, **rest):
        super().__init__()
        check_keys("SingleRoIExtractor", rest, set())
        layer = dict(roi_layer)
        if layer.pop("type", "RoIAlign") != "RoIAlign" or layer.pop("pool_mode", "avg") != "avg":
            raise unsupported(f"RoI layer {roi_layer!r}")
        layer.pop("use_torchvision", None)
        size = layer.pop("output_size")
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)
        self.sampling_ratio = int(layer.pop("sampling_ratio", 0))
        self.aligned = bool(layer.pop("aligned", True))
        check_keys("RoIAlign", layer, set())
        self.out_channels, self.finest_scale = out_channels, finest_scale
        self.featmap_strides = list(featmap_strides)

    @property
    def num_inputs(self) -> int:
        return len(self.featmap_strides)

    def forward(self, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``rois [R, 5]`` (batch index, x1, y1, x2, y2) → ``[R, C, s, s]``."""
        from torchvision.ops import box_area

        rois = rois.type_as(feats[0])
        out = feats[0].new_zeros(rois.size(0), self.out_channels, *self.output_size)  # R, C, s, s
        num_levels = len(feats)

        def pool(level: int, r: torch.Tensor) -> torch.Tensor:
            return roi_align(feats[level], r, self.output_size,
                             spatial_scale=1.0 / self.featmap_strides[level],
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)

        if num_levels == 1:
            return out if len(rois) == 0 else pool(0, rois)
        scale = torch.sqrt(box_area(rois[:, 1:]))  # R: √((x2−x1)·(y2−y1)), as mmdet
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        levels = levels.clamp(min=0, max=num_levels - 1).long()  # R
        for level in range(num_levels):
            inds = (levels == level).nonzero(as_tuple=False).squeeze(1)
            if inds.numel() > 0:
                out[inds] = pool(level, rois[inds])
        return out


class ConvFCBBoxHead(nn.Module):
    """mmdet ``models/roi_heads/bbox_heads/convfc_bbox_head.py`` ``ConvFCBBoxHead``: shared convs,
    flatten, shared FCs with ReLU, then cls / reg branches of convs and FCs, ``fc_cls`` and
    ``fc_reg``, with class-agnostic regression (``fc_reg`` → 4) and its ``DeltaXYWHBBoxCoder``.

    ``fc_cls`` has ``cls_out_channels`` outputs (default ``num_classes + 1``, mmdet's softmax
    classifier); an open-vocabulary head (``ovdense.heads.fvit_parts.OpenVocabBBoxHead``) sets it to
    the joint embedding width and scores the output against text embeddings.
    """

    #: the config ``type`` named in errors about unknown options
    config_type = "ConvFCBBoxHead"

    def __init__(self, in_channels: int = 256, roi_feat_size=7, num_classes: int = 80,
                 num_shared_convs: int = 0, num_shared_fcs: int = 0, num_cls_convs: int = 0,
                 num_cls_fcs: int = 0, num_reg_convs: int = 0, num_reg_fcs: int = 0,
                 conv_out_channels: int = 256, fc_out_channels: int = 1024, conv_cfg=None, norm_cfg=None,
                 bbox_coder: dict | None = None, reg_class_agnostic: bool = False,
                 with_avg_pool: bool = False, with_cls: bool = True, with_reg: bool = True,
                 cls_predictor_cfg=None, reg_predictor_cfg=None, cls_out_channels: int | None = None, **rest):
        super().__init__()
        check_keys(self.config_type, rest, set())
        if not reg_class_agnostic or with_avg_pool or not with_cls or not with_reg:
            raise unsupported("a box head other than class-agnostic, with cls and reg branches, no avg pool")
        for name, cfg in (("cls_predictor_cfg", cls_predictor_cfg), ("reg_predictor_cfg", reg_predictor_cfg)):
            if cfg is not None and dict(cfg).get("type") != "Linear":
                raise unsupported(f"{name} {cfg!r}")
        if (num_cls_convs > 0 or num_reg_convs > 0) and num_shared_fcs:
            raise OvdenseError("ConvFCBBoxHead: branch convs need num_shared_fcs == 0")
        size = (roi_feat_size, roi_feat_size) if isinstance(roi_feat_size, int) else tuple(roi_feat_size)
        self.roi_feat_area = size[0] * size[1]
        self.conv_out_channels, self.fc_out_channels = conv_out_channels, fc_out_channels
        self.conv_cfg, self.norm_cfg = conv_cfg, norm_cfg
        self.num_shared_fcs = num_shared_fcs
        self.shared_convs, self.shared_fcs, shared_out = self._branch(num_shared_convs, num_shared_fcs,
                                                                      in_channels, True)
        self.cls_convs, self.cls_fcs, cls_last = self._branch(num_cls_convs, num_cls_fcs, shared_out)
        self.reg_convs, self.reg_fcs, reg_last = self._branch(num_reg_convs, num_reg_fcs, shared_out)
        if num_shared_fcs == 0:
            if num_cls_fcs == 0:
                cls_last *= self.roi_feat_area
            if num_reg_fcs == 0:
                reg_last *= self.roi_feat_area
        self.fc_cls = nn.Linear(cls_last, num_classes + 1 if cls_out_channels is None else cls_out_channels)
        self.fc_reg = nn.Linear(reg_last, 4)
        coder = dict(bbox_coder or {})
        if coder.pop("type", "DeltaXYWHBBoxCoder") != "DeltaXYWHBBoxCoder":
            raise unsupported(f"box coder {bbox_coder.get('type')!r}")
        self.bbox_coder = DeltaXYWHBBoxCoder(**coder)

    def _branch(self, num_convs: int, num_fcs: int, in_channels: int, shared: bool = False):
        """``ConvFCBBoxHead._add_conv_fc_branch``."""
        last = in_channels
        convs = nn.ModuleList()
        for i in range(num_convs):
            convs.append(ConvModule(last if i == 0 else self.conv_out_channels, self.conv_out_channels, 3,
                                    padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                    act_cfg=dict(type="ReLU")))
        if num_convs:
            last = self.conv_out_channels
        fcs = nn.ModuleList()
        if num_fcs > 0:
            if shared or self.num_shared_fcs == 0:
                last *= self.roi_feat_area
            for i in range(num_fcs):
                fcs.append(nn.Linear(last if i == 0 else self.fc_out_channels, self.fc_out_channels))
            last = self.fc_out_channels
        return convs, fcs, last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [R, C, s, s]`` → ``fc_cls``'s output ``[R, cls_out_channels]`` and deltas ``[R, 4]``."""
        for conv in self.shared_convs:
            x = conv(x)
        if self.num_shared_fcs > 0:
            x = x.flatten(1)  # R, C·s·s
            for fc in self.shared_fcs:
                x = F.relu(fc(x), inplace=not torch.is_grad_enabled())
        x_cls = x_reg = x
        for conv in self.cls_convs:
            x_cls = conv(x_cls)
        if x_cls.dim() > 2:
            x_cls = x_cls.flatten(1)
        for fc in self.cls_fcs:
            x_cls = F.relu(fc(x_cls))
        for conv in self.reg_convs:
            x_reg = conv(x_reg)
        if x_reg.dim() > 2:
            x_reg = x_reg.flatten(1)
        for fc in self.reg_fcs:
            x_reg = F.relu(fc(x_reg))
        return self.fc_cls(x_cls), self.fc_reg(x_reg)  # R, cls_out_channels and R, 4


class FCNMaskHead(nn.Module):
    """mmdet ``models/roi_heads/mask_heads/fcn_mask_head.py`` ``FCNMaskHead`` (class-agnostic, the
    only kind that serves any vocabulary): ``num_convs`` 3×3 ``ConvModule``s, the upsample (a
    stride-2 deconv + ReLU by default; nearest/bilinear), ``conv_logits`` 1×1 → ``[K, 1, 2s, 2s]``.
    ``paste`` is its ``_predict_by_feat_single`` + ``_do_paste_mask`` on CPU: sigmoid, boxes divided
    by the scale factor, each mask ``grid_sample``d (``align_corners=False``) into its box's pixel
    window ``[⌊x1⌋−1, ⌈x2⌉+1)`` (mmdet's ``skip_empty``), thresholded ``≥ mask_thr_binary``.
    Departure: mmdet on a GPU pastes in chunks over the whole image; this path always pastes box
    by box as mmdet does on CPU (values differ only outside a box's one-pixel margin)."""

    def __init__(self, num_convs: int = 4, roi_feat_size: int = 14, in_channels: int = 256,
                 conv_kernel_size: int = 3, conv_out_channels: int = 256, num_classes: int = 80,
                 class_agnostic: bool = False, upsample_cfg: dict | None = None, conv_cfg=None, norm_cfg=None,
                 predictor_cfg=None, **rest):
        super().__init__()
        check_keys("FCNMaskHead", rest, set())
        if not class_agnostic:
            raise unsupported("a mask head that is not class_agnostic (masks for any vocabulary need it)")
        if predictor_cfg is not None and dict(predictor_cfg).get("type") not in ("Conv", "Conv2d"):
            raise unsupported(f"mask predictor {predictor_cfg!r}")
        upsample = dict(upsample_cfg or dict(type="deconv", scale_factor=2))
        self.upsample_method = upsample.pop("type")
        self.scale_factor = upsample.pop("scale_factor", None)
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, conv_kernel_size,
                       padding=(conv_kernel_size - 1) // 2, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=dict(type="ReLU")) for i in range(num_convs))
        upsample_in = conv_out_channels if num_convs > 0 else in_channels
        if self.upsample_method == "deconv":
            self.upsample = nn.ConvTranspose2d(upsample_in, conv_out_channels, self.scale_factor,
                                               stride=self.scale_factor)
            logits_in = conv_out_channels
        elif self.upsample_method in (None, "nearest", "bilinear"):
            self.upsample = None
            logits_in = upsample_in
        else:
            raise unsupported(f"mask upsample {self.upsample_method!r}")
        self.conv_logits = nn.Conv2d(logits_in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        if self.upsample_method == "deconv":
            x = F.relu(self.upsample(x))
        elif self.upsample_method is not None:
            x = F.interpolate(x, scale_factor=self.scale_factor, mode=self.upsample_method,
                              align_corners=None if self.upsample_method == "nearest" else False)
        return self.conv_logits(x)  # K, 1, 2s, 2s

    @staticmethod
    def paste(mask_logits: torch.Tensor, bboxes: torch.Tensor, meta: dict, threshold: float) -> torch.Tensor:
        """``mask_logits [K, 1, m, m]``, ``bboxes [K, 4]`` in resized pixels (divided by the scale
        factor in place, as mmdet) → bool masks ``[K, H, W]`` at ``ori_shape``."""
        scale = bboxes.new_tensor(meta["scale_factor"]).repeat((1, 2))  # 1, 4
        img_h, img_w = meta["ori_shape"][:2]
        probs = mask_logits.sigmoid()
        bboxes /= scale
        N = len(probs)
        out = torch.zeros(N, img_h, img_w, device=bboxes.device,
                          dtype=torch.bool if threshold >= 0 else torch.uint8)  # K, H, W
        for inds in torch.chunk(torch.arange(N, device=bboxes.device), N):
            chunk, window = paste_masks(probs[inds], bboxes[inds], img_h, img_w)
            chunk = (chunk >= threshold).to(torch.bool) if threshold >= 0 else (chunk * 255).to(torch.uint8)
            out[(inds,) + window] = chunk
        return out
