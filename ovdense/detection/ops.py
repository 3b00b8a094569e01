"""Box and mask ops of mmcv / mmdet's test path: NMS (single, batched, multi-class), ``bbox2roi``,
mask pasting."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ovdense.detection.config import unsupported


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0,
        score_threshold: float = 0.0, max_num: int = -1) -> torch.Tensor:
    """mmcv ``ops/nms.py`` ``nms`` (its ``NMSop``): greedy NMS in descending score order,
    suppressing IoU ``>`` the threshold, areas ``(x2−x1)·(y2−y1)`` (``offset=0``). Runs
    ``torchvision.ops.nms``: the same loop over the same IoU (on random boxes it keeps the same
    set as mmcv's kernel, in the same order except among boxes of exactly equal score, which the
    two kernels' sorts may visit in another order). mmcv's ``offset=1`` (the old pixel convention,
    ``+1`` on every width and height) has no torchvision mode and no shipped config uses it:
    refused, not approximated."""
    from torchvision.ops import nms as torchvision_nms

    if offset != 0:
        raise unsupported("nms offset=1")
    if score_threshold > 0:
        valid = scores > score_threshold
        boxes, scores = boxes[valid], scores[valid]
        valid_inds = torch.nonzero(valid, as_tuple=False).squeeze(dim=1)
    inds = torchvision_nms(boxes, scores, float(iou_threshold))
    if max_num > 0:
        inds = inds[:max_num]
    if score_threshold > 0:
        inds = valid_inds[inds]
    return inds


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, nms_cfg: dict,
                class_agnostic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmcv ``ops/nms.py`` ``batched_nms``: NMS within each ``idxs`` group. Below ``split_thr``
    (10000) boxes, one NMS over boxes shifted by ``idx · (max coordinate + 1)``; above, one NMS per
    group, merged by descending score. Returns ``(boxes [K, 4], scores [K], keep [K])``.

    Not ``torchvision.ops.batched_nms``: it takes the per-group loop above 1000 boxes on CPU (25000
    on GPU) where mmcv keeps the shifted single NMS up to 10000, and IoUs of shifted and unshifted
    boxes round differently: two boxes with IoU 0.7000003 among 1500 (an RPN's proposals are up to
    5 × 1000) are both kept by mmcv and here, one dropped by torchvision at threshold 0.7."""
    cfg = dict(nms_cfg)
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))  # K
        boxes_for_nms = boxes + offsets[:, None]  # K, 4
    kind = cfg.pop("type", "nms")
    if kind != "nms":
        raise unsupported(f"nms type {kind!r}")
    split_thr = cfg.pop("split_thr", 10000)
    if boxes_for_nms.shape[0] < split_thr:
        keep = nms(boxes_for_nms, scores, **cfg)
        boxes, scores = boxes[keep], scores[keep]
    else:
        max_num = cfg.pop("max_num", -1)
        total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
        scores_after = scores.new_zeros(scores.size())
        for group in torch.unique(idxs):
            mask = (idxs == group).nonzero(as_tuple=False).view(-1)
            kept = nms(boxes_for_nms[mask], scores[mask], **cfg)
            total_mask[mask[kept]] = True
            scores_after[mask[kept]] = scores[mask][kept]
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        scores, order = scores_after[keep].sort(descending=True)
        keep = keep[order]
        boxes = boxes[keep]
        if max_num > 0:
            keep, boxes, scores = keep[:max_num], boxes[:max_num], scores[:max_num]
    return boxes, scores, keep


def multiclass_nms(multi_bboxes: torch.Tensor, multi_scores: torch.Tensor, score_thr: float, nms_cfg: dict,
                   max_num: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet ``models/layers/bbox_nms.py`` ``multiclass_nms``: every (box, class) pair with score
    ``> score_thr`` (background column dropped), NMS per class (``batched_nms``), the first
    ``max_num``. ``multi_bboxes [R, 4]`` (class-agnostic) or ``[R, 4·C]``; ``multi_scores
    [R, C+1]``. Returns ``(boxes [K, 4], scores [K], labels [K])``."""
    num_classes = multi_scores.size(1) - 1
    if multi_bboxes.shape[1] > 4:
        bboxes = multi_bboxes.view(multi_scores.size(0), -1, 4)  # R, C, 4
    else:
        bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 4)  # R, C, 4
    scores = multi_scores[:, :-1]  # R, C
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1).expand_as(scores)
    bboxes, scores, labels = bboxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)  # R·C
    inds = (scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return bboxes, scores, labels
    boxes, scores, keep = batched_nms(bboxes, scores, labels, nms_cfg)
    if max_num > 0:
        boxes, scores, keep = boxes[:max_num], scores[:max_num], keep[:max_num]
    return boxes, scores, labels[keep]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int):
    """mmdet ``fcn_mask_head.py`` ``_do_paste_mask`` with ``skip_empty=True``: the masks
    ``[n, 1, m, m]`` resampled (``grid_sample``, pixel centres) onto the pixel window around the
    boxes ``[n, 4]``. Returns the window's masks ``[n, h', w']`` and its ``(rows, columns)`` slices.
    (torchvision's Mask R-CNN pasting widens each box and resizes by ``interpolate``: other values.)"""
    x0_int, y0_int = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
    x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
    y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # n, 1 each
    n = masks.shape[0]
    img_y = torch.arange(y0_int, y1_int, device=masks.device).to(torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, device=masks.device).to(torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # n, h'
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1  # n, w'
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))  # n, h', w'
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))  # n, h', w'
    grid = torch.stack([gx, gy], dim=3)  # n, h', w', 2
    pasted = F.grid_sample(masks.to(dtype=torch.float32), grid, align_corners=False)  # n, 1, h', w'
    return pasted[:, 0], (slice(y0_int, y1_int), slice(x0_int, x1_int))


def bbox2roi(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """mmdet ``structures/bbox/transforms.py`` ``bbox2roi``: boxes ``[n_i, 4]`` per image → ``[N, 5]``
    rows (image index, x1, y1, x2, y2), the RoI format of ``roi_align``."""
    return torch.cat([torch.cat([b.new_full((b.size(0), 1), i), b], dim=-1) for i, b in enumerate(boxes)])


#: below this many RoIs one call is cheaper than splitting them between threads
PARALLEL_ROIS = 64


def roi_align(feats: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """``torchvision.ops.roi_align`` with the RoIs split between ``torch.get_num_threads()`` threads on
    a CPU: torchvision's CPU kernel runs on one core, and every RoI is pooled on its own, so the
    result is the single call's bit for bit (``tests/test_detection.py``)."""
    from torchvision.ops import roi_align as torchvision_roi_align

    def pool(part: torch.Tensor) -> torch.Tensor:
        return torchvision_roi_align(feats, part, output_size, spatial_scale=spatial_scale,
                                     sampling_ratio=sampling_ratio, aligned=aligned)

    threads = torch.get_num_threads()
    if feats.device.type != "cpu" or threads < 2 or len(rois) < PARALLEL_ROIS:
        return pool(rois)
    from ovdense.kernels.native import thread_pool

    return torch.cat(list(thread_pool(threads).map(pool, rois.chunk(threads))))
