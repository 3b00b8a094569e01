"""Necks and conv bricks: mmcv's ``ConvModule``, mmdet's ``FPN``, and the norm choice of ovdense's own
pyramids (``make_norm``)."""

from __future__ import annotations

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
    """mmcv ``cnn/bricks/conv_module.py`` ``ConvModule`` at its default ``order=('conv', 'norm', 'act')``:
    conv (bias only without a norm, ``bias='auto'``) → norm → ReLU. The norm is registered under
    mmcv's abbreviation (``gn``, ``bn``: ``build_norm_layer``) so state-dict keys are mmdet's.
    BatchNorm and SyncBN are both ``BatchNorm2d`` here (identical in eval mode)."""

    _NORMS = {"GN": "gn", "BN": "bn", "BN2d": "bn", "SyncBN": "bn"}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, conv_cfg=None, norm_cfg=None, act_cfg=None):
        super().__init__()
        if conv_cfg is not None and dict(conv_cfg).get("type") not in ("Conv", "Conv2d"):
            raise unsupported(f"conv {conv_cfg!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              bias=norm_cfg is None)
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
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return F.relu(x) if self.relu else x


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

