"""A plain-torch two-stage detector: mmdet 3.3's test path, laid out by part as mmdet's ``models/``.

Each class or function follows one mmdet 3.3.0 / mmcv 2.x file (named in its docstring) at the
options the configs use, with mmdet's parameter names, so a head file written by
``ovdense.mm.detection.export_head`` loads strictly; options not reproduced are refused with an
``OvdenseError`` rather than approximated. Only torch and torchvision.ops; no mmcv, mmdet or mmengine.

* ``necks``: ``ConvModule``, ``FPN``, ``NASFPN`` (with mmcv's merge cells), ``build_neck`` and ``make_norm``.
* ``task_modules``: ``AnchorGenerator`` and ``DeltaXYWHBBoxCoder``.
* ``ops``: mmcv's ``nms`` / ``batched_nms``, mmdet's ``multiclass_nms``, ``bbox2roi``, mask pasting.
* ``rpn``: ``RPNHead`` (anchors, deltas, per-level NMS).
* ``roi_heads``: ``SingleRoIExtractor``, ``ConvFCBBoxHead``, ``FCNMaskHead``.
* ``config``: reading mmdet config dicts (refusing unsupported options).

torchvision's ops are used where they compute what mmcv computes: ``roi_align(aligned=True)``
(mmcv's ``RoIAlign(aligned=True)``, the same detectron2 kernel), ``nms`` (mmcv's greedy loop at
``offset=0``), ``clip_boxes_to_image``, ``box_area``. Kept by hand, with the reason beside each:
mmcv's ``batched_nms`` (torchvision's switches to a per-class loop above 1000 CPU boxes, mmcv
only above 10000), the anchors, the box coder, the small-box filter, the level mapping and the mask
pasting (torchvision's own versions round, compare or resample differently).

Departures: masks are always pasted box by box (mmdet's CPU branch; on a GPU mmdet pastes in chunks
over the whole image); mmcv ``nms`` ``offset=1``, soft-NMS, class-specific mask heads,
``with_avg_pool`` box heads, shared RoI heads and non-ReLU activations are refused.

The F-ViT detector built from these parts is ``ovdense.heads.fvit.PlainFViT``. Nothing here imports
``ovdense.heads``, ``ovdense.backbone`` or ``ovdense.mm``.
"""
