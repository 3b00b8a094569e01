"""Necks and conv bricks: mmcv's ``ConvModule``, mmdet's ``FPN`` and ``NASFPN``, and the norm choice of
ovdense's own pyramids (``make_norm``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.detection.config import check_keys, is_relu, unsupported
from ovdense.errors import OvdenseError


def make_norm(norm: str, channels: int, num_groups: int = 32) -> nn.Module:
    """``"group"`` (GroupNorm), ``"batch"``, ``"sync_batch"`` (F-ViT's SyncBN) or ``"none"``."""
    if norm == "group":
        if channels % num_groups:
            raise OvdenseError(f"GroupNorm: {channels} channels do not split into {num_groups} groups; "
                               "pick num_groups dividing the width")
        return nn.GroupNorm(num_groups, channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if norm == "none":
        return nn.Identity()
    raise OvdenseError(f"norm must be group, batch, sync_batch or none, not {norm!r}")


class ConvModule(nn.Module):
    """mmcv ``cnn/bricks/conv_module.py`` ``ConvModule``: conv (``bias="auto"``: a bias only without a
    norm) → norm → ReLU at the default ``order=("conv", "norm", "act")``; NAS-FPN's merge cells use
    ``("act", "conv", "norm")``. The norm is registered under mmcv's abbreviation (``gn``, ``bn``:
    ``build_norm_layer``) so state-dict keys are mmdet's. BatchNorm and SyncBN are both ``BatchNorm2d``
    here (identical in eval mode)."""

    _NORMS = {"GN": "gn", "BN": "bn", "BN2d": "bn", "SyncBN": "bn"}
    _ORDERS = (("conv", "norm", "act"), ("act", "conv", "norm"))

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, conv_cfg=None, norm_cfg=None, act_cfg=None, bias="auto",
                 order: Sequence[str] = ("conv", "norm", "act"), groups: int = 1):
        super().__init__()
        if conv_cfg is not None and dict(conv_cfg).get("type") not in ("Conv", "Conv2d"):
            raise unsupported(f"conv {conv_cfg!r}")
        if tuple(order) not in self._ORDERS:
            raise unsupported(f"ConvModule order {tuple(order)}")
        if groups != 1:
            raise unsupported(f"grouped convs (groups={groups})")
        self.order = tuple(order)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              bias=norm_cfg is None if bias == "auto" else bool(bias))
        self.norm_name = None
        if norm_cfg is not None:
            norm_cfg = dict(norm_cfg)
            kind = norm_cfg.get("type")
            if kind not in self._NORMS:
                raise unsupported(f"norm {kind!r}")
            eps = float(norm_cfg.get("eps", 1e-5))
            norm = (nn.GroupNorm(int(norm_cfg["num_groups"]), out_channels, eps=eps) if kind == "GN"
                    else nn.BatchNorm2d(out_channels, eps=eps))
            self.norm_name = self._NORMS[kind]
            self.add_module(self.norm_name, norm)
        self.relu = is_relu(act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and self.norm_name is not None:
                x = getattr(self, self.norm_name)(x)
            elif layer == "act" and self.relu:  # in place at inference: x is this module's own result
                x = F.relu(x, inplace=not torch.is_grad_enabled() and layer != self.order[0])
        return x


class FPN(nn.Module):
    """mmdet ``models/necks/fpn.py`` ``FPN``: 1×1 lateral ``ConvModule``s, top-down
    ``laterals[i-1] += interpolate(laterals[i], size=…)`` (``upsample_cfg``, nearest by default),
    3×3 output ``ConvModule``s; extra levels by ``max_pool2d(out, 1, stride=2)`` when
    ``add_extra_convs=False`` (Faster / Mask R-CNN), else stride-2 3×3 convs on the input, lateral or
    output (RetinaNet's options). Norm and activation: mmdet's defaults (none)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, add_extra_convs=False, relu_before_extra_convs: bool = False,
                 no_norm_on_lateral: bool = False, conv_cfg=None, norm_cfg=None, act_cfg=None,
                 upsample_cfg=None, **rest):
        super().__init__()
        check_keys("FPN", rest, set())
        in_channels = list(in_channels)
        self.num_outs, self.start_level = int(num_outs), int(start_level)
        self.upsample_cfg = dict(upsample_cfg or dict(mode="nearest"))
        self.relu_before_extra_convs = relu_before_extra_convs
        if end_level == -1 or end_level == len(in_channels) - 1:
            self.backbone_end_level = len(in_channels)
        else:
            self.backbone_end_level = end_level + 1
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs not in (False, "on_input", "on_lateral", "on_output"):
            raise unsupported(f"FPN add_extra_convs={add_extra_convs!r}")
        self.add_extra_convs = add_extra_convs
        self.lateral_convs, self.fpn_convs = nn.ModuleList(), nn.ModuleList()
        for i in range(self.start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvModule(in_channels[i], out_channels, 1, conv_cfg=conv_cfg,
                                                 norm_cfg=None if no_norm_on_lateral else norm_cfg,
                                                 act_cfg=act_cfg))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg,
                                             norm_cfg=norm_cfg, act_cfg=act_cfg))
        extra_levels = self.num_outs - self.backbone_end_level + self.start_level
        if add_extra_convs and extra_levels >= 1:
            for i in range(extra_levels):
                on_input = i == 0 and add_extra_convs == "on_input"
                channels = in_channels[self.backbone_end_level - 1] if on_input else out_channels
                self.fpn_convs.append(ConvModule(channels, out_channels, 3, stride=2, padding=1,
                                                 conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):  # top-down
            if "scale_factor" in self.upsample_cfg:
                laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                size = laterals[i - 1].shape[2:]
                laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=size, **self.upsample_cfg)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > len(outs):
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                else:
                    source = laterals[-1] if self.add_extra_convs == "on_lateral" else outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    last = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](last))
        return tuple(outs)



class MergeCell(nn.Module):
    """mmcv ``ops/merge_cells.py`` ``SumCell`` (``x1 + x2``) and ``GlobalPoolingCell``
    (``x2 + sigmoid(avgpool(x2)) · x1``), as NAS-FPN builds them: both inputs resized to ``out_size``
    (``BaseMergeCell._resize``: nearest upsampling when the input's ``(h, w)`` compares below the size
    as Python tuples, else zero-padding split evenly (the extra pixel right/bottom) to a multiple of the
    size and a max-pool), then, with ``with_out_conv``, ReLU → 3×3 conv (with bias) → norm."""

    def __init__(self, op: str, channels: int | None = None, with_out_conv: bool = True, norm_cfg=None):
        super().__init__()
        if op not in ("sum", "global_pool"):
            raise unsupported(f"merge cell {op!r}")
        self.op = op
        self.with_out_conv = with_out_conv
        if with_out_conv:
            self.out_conv = ConvModule(channels, channels, 3, padding=1, bias=True, norm_cfg=norm_cfg,
                                       act_cfg=dict(type="ReLU"), order=("act", "conv", "norm"))

    @staticmethod
    def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        have = tuple(x.shape[-2:])
        if have == size:
            return x
        if have < size:  # mmcv compares the shapes as tuples (lexicographically): kept as it is
            return F.interpolate(x, size=size, mode="nearest")
        h, w = have
        if h % size[0] or w % size[1]:
            pad_h = math.ceil(h / size[0]) * size[0] - h
            pad_w = math.ceil(w / size[1]) * size[1] - w
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        kernel = (x.shape[-2] // size[0], x.shape[-1] // size[1])
        return F.max_pool2d(x, kernel_size=kernel, stride=kernel)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, out_size) -> torch.Tensor:
        size = tuple(int(v) for v in out_size)
        x1, x2 = self.resize(x1, size), self.resize(x2, size)
        x = x1 + x2 if self.op == "sum" else x2 + torch.sigmoid(F.adaptive_avg_pool2d(x2, 1)) * x1
        return self.out_conv(x) if self.with_out_conv else x


class NASFPN(nn.Module):
    """mmdet ``models/necks/nas_fpn.py`` ``NASFPN`` (Ghiasi et al., "NAS-FPN", CVPR 2019), the neck of
    CLIM's OV-LVIS ViT-B/16 detector: 1×1 lateral ``ConvModule``s (norm, no activation) on the inputs,
    extra levels by a 1×1 ``ConvModule`` and a 2×2 max-pool on the last, then ``stack_times`` stages of
    nine merge cells over exactly five levels P3–P7 (mmdet's cell names and order). State-dict keys are
    mmdet's (``lateral_convs.*``, ``extra_downsamples.*``, ``fpn_stages.<i>.<cell>.*``)."""

    #: one stage: (cell, op, with its own out_conv)
    CELLS = (("gp_64_4", "global_pool", True), ("sum_44_4", "sum", True), ("sum_43_3", "sum", True),
             ("sum_34_4", "sum", True), ("gp_43_5", "global_pool", False), ("sum_55_5", "sum", True),
             ("gp_54_7", "global_pool", False), ("sum_77_7", "sum", True), ("gp_75_6", "global_pool", True))

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, stack_times: int,
                 start_level: int = 0, end_level: int = -1, norm_cfg=None, **rest):
        super().__init__()
        check_keys("NASFPN", rest, set())
        in_channels = list(in_channels)
        if end_level == -1 or end_level == len(in_channels) - 1:
            end = len(in_channels)
        else:
            end = end_level + 1
        self.start_level = int(start_level)
        if num_outs != 5:
            raise unsupported(f"NASFPN with num_outs={num_outs} (its stages read five levels, P3–P7)")
        self.lateral_convs = nn.ModuleList(
            ConvModule(in_channels[i], out_channels, 1, norm_cfg=norm_cfg)
            for i in range(self.start_level, end))
        self.extra_downsamples = nn.ModuleList(
            nn.Sequential(ConvModule(out_channels, out_channels, 1, norm_cfg=norm_cfg), nn.MaxPool2d(2, 2))
            for _ in range(num_outs - end + self.start_level))
        self.fpn_stages = nn.ModuleList(
            nn.ModuleDict({name: MergeCell(op, out_channels if conv else None, conv, norm_cfg)
                           for name, op, conv in self.CELLS}) for _ in range(int(stack_times)))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feats = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for downsample in self.extra_downsamples:
            feats.append(downsample(feats[-1]))
        p3, p4, p5, p6, p7 = feats
        for stage in self.fpn_stages:
            p4_1 = stage["gp_64_4"](p6, p4, p4.shape[-2:])
            p4_2 = stage["sum_44_4"](p4_1, p4, p4.shape[-2:])
            p3 = stage["sum_43_3"](p4_2, p3, p3.shape[-2:])
            p4 = stage["sum_34_4"](p3, p4_2, p4.shape[-2:])
            p5 = stage["sum_55_5"](p5, stage["gp_43_5"](p4, p3, p5.shape[-2:]), p5.shape[-2:])
            p7 = stage["sum_77_7"](p7, stage["gp_54_7"](p5, p4_2, p7.shape[-2:]), p7.shape[-2:])
            p6 = stage["gp_75_6"](p7, p5, p6.shape[-2:])
        return p3, p4, p5, p6, p7


def build_neck(cfg) -> nn.Module:
    """An ``FPN`` or a ``NASFPN`` from an mmdet neck config."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "FPN")
    if kind == "FPN":
        return FPN(**cfg)
    if kind == "NASFPN":
        return NASFPN(**cfg)
    raise unsupported(f"neck type {kind!r} (FPN or NASFPN)")
