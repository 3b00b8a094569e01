"""mmdet's region proposal network at test time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.detection.config import check_keys, unsupported
from ovdense.detection.necks import ConvModule
from ovdense.detection.ops import batched_nms
from ovdense.detection.task_modules import AnchorGenerator, DeltaXYWHBBoxCoder
from ovdense.errors import OvdenseError


class RPNHead(nn.Module):
    """mmdet ``models/dense_heads/rpn_head.py`` ``RPNHead``: ``num_convs`` 3×3 ``ConvModule``s
    (ReLU; one plain conv when ``num_convs == 1``), ReLU, 1×1 ``rpn_cls`` / ``rpn_reg``; test time
    (``_predict_by_feat_single`` + ``_bbox_post_process``): per level the sigmoid scores sorted,
    the top ``nms_pre``, decoded on the anchors and clipped to ``img_shape``; boxes not wider and
    taller than ``min_bbox_size`` dropped; NMS per level (``batched_nms`` with the level ids); the
    first ``max_per_img``."""

    def __init__(self, in_channels: int, anchor_generator: dict, feat_channels: int = 256, num_convs: int = 1,
                 bbox_coder: dict | None = None, num_classes: int = 1, loss_cls: dict | None = None, **rest):
        super().__init__()
        check_keys("RPNHead", rest, {"test_cfg"})
        if num_classes != 1:
            raise OvdenseError(f"RPNHead has one class, the config gives {num_classes}")
        self.use_sigmoid = dict(loss_cls or dict(use_sigmoid=True)).get("use_sigmoid", False)
        self.cls_out_channels = 1 if self.use_sigmoid else 2
        anchors = dict(anchor_generator)
        if anchors.pop("type", "AnchorGenerator") != "AnchorGenerator":
            raise unsupported(f"prior generator {anchor_generator.get('type')!r}")
        coder = dict(bbox_coder or {})
        if coder.pop("type", "DeltaXYWHBBoxCoder") != "DeltaXYWHBBoxCoder":
            raise unsupported(f"box coder {bbox_coder.get('type')!r}")
        self.prior_generator = AnchorGenerator(**anchors)
        self.bbox_coder = DeltaXYWHBBoxCoder(**coder)
        A = self.prior_generator.num_base_priors
        if num_convs > 1:
            self.rpn_conv = nn.Sequential(*[
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1,
                           act_cfg=dict(type="ReLU")) for i in range(num_convs)])
        else:
            self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, A * self.cls_out_channels, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, A * 4, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scores, deltas = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            scores.append(self.rpn_cls(x))  # B, A·c, h, w
            deltas.append(self.rpn_reg(x))  # B, A·4, h, w
        return scores, deltas

    def predict(self, feats: Sequence[torch.Tensor], metas: Sequence[dict], cfg: dict) -> list[torch.Tensor]:
        """Proposals ``[P, 4]`` per image, in pixels of the resized image, best first."""
        cls_scores, bbox_preds = self(feats)
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = self.prior_generator.grid_priors(sizes, dtype=cls_scores[0].dtype,
                                                  device=cls_scores[0].device)
        return [self._single([c[i].detach() for c in cls_scores], [b[i].detach() for b in bbox_preds], priors,
                             meta, cfg) for i, meta in enumerate(metas)]

    def _single(self, cls_scores, bbox_preds, mlvl_priors, meta: dict, cfg: dict) -> torch.Tensor:
        nms_pre = cfg.get("nms_pre", -1)
        all_deltas, all_priors, all_scores, level_ids = [], [], [], []
        for level, (cls_score, bbox_pred, priors) in enumerate(zip(cls_scores, bbox_preds, mlvl_priors)):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)  # h·w·A, 4
            cls_score = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels)  # h·w·A, c
            scores = cls_score.sigmoid() if self.use_sigmoid else cls_score.softmax(-1)[:, :-1]
            scores = torch.squeeze(scores)  # h·w·A
            if 0 < nms_pre < scores.shape[0]:
                ranked, rank_inds = scores.sort(descending=True)
                top = rank_inds[:nms_pre]
                scores, bbox_pred, priors = ranked[:nms_pre], bbox_pred[top, :], priors[top]
            all_deltas.append(bbox_pred)
            all_priors.append(priors)
            all_scores.append(scores)
            level_ids.append(scores.new_full((scores.size(0),), level, dtype=torch.long))
        bboxes = self.bbox_coder.decode(torch.cat(all_priors), torch.cat(all_deltas),
                                        max_shape=meta["img_shape"])  # P, 4
        scores, level_ids = torch.cat(all_scores), torch.cat(level_ids)
        if cfg.get("min_bbox_size", -1) >= 0:
            w, h = bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]
            # strictly larger, as mmdet (torchvision's remove_small_boxes keeps sizes equal to it)
            valid = (w > cfg["min_bbox_size"]) & (h > cfg["min_bbox_size"])
            if not valid.all():
                bboxes, scores, level_ids = bboxes[valid], scores[valid], level_ids[valid]
        if bboxes.numel() == 0:
            return bboxes.new_zeros(0, 4)
        _, _, keep = batched_nms(bboxes, scores, level_ids, cfg["nms"])
        return bboxes[keep][:cfg["max_per_img"]]
