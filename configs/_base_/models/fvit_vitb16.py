# F-ViT on frozen OpenAI CLIP ViT-B/16: the model the OV-COCO and OV-LVIS recipes share
# (configs/ovdet/fvit_vitb16_ovcoco.py, fvit_vitb16_ovlvis.py; the L/14 configs inherit those).
#
# wusize/CLIPSelf F-ViT (mmdet 2.28) and its mmdet 3.x port wusize/CLIM ovdet: taps (3, 5, 7, 11),
# the simple pyramid into an FPN of 256, an RPN with 2 convs, a 4conv2fc box head (FC 512) with
# class-agnostic regression, τ = 50 learned, ensemble α = 0.1. GroupNorm instead of SyncBN (one device
# works too). RoIs and anchors are sampled by SeededRandomSampler (mmdet's RandomSampler seeded per
# image: a resumed run and any number of processes sample what one uninterrupted process samples).
# Each recipe adds its vocabulary (classes, num_classes, the background class weight), β and T_vlm,
# its rcnn test thresholds, and for OV-LVIS the mask head.

norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)

model = dict(
    type="OvdenseFViT",
    clip=dict(name="ViT-B-16", pretrained="openai"),
    templates="imagenet80",
    method="maskclip",
    indices=(3, 5, 7, 11),
    pyramid=dict(norm="group", num_groups=32),
    neck=dict(type="FPN", in_channels=[768] * 4, out_channels=256, num_outs=5, norm_cfg=norm_cfg),
    rpn_head=dict(
        type="RPNHead", in_channels=256, feat_channels=256, num_convs=2,
        anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                              strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
    roi_head=dict(
        type="OvdenseFViTRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
            out_channels=256, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type="OvdenseFViTBBoxHead", in_channels=256, conv_out_channels=256, fc_out_channels=512,
            roi_feat_size=7, num_shared_convs=4, num_shared_fcs=2, num_cls_fcs=1,
            num_reg_fcs=1, norm_cfg=norm_cfg, reg_class_agnostic=True,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            alpha=0.1, temperature=50.0)),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type="SeededRandomSampler", stream=0, num=256, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
            allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=False, ignore_iof_thr=-1),
            sampler=dict(type="SeededRandomSampler", stream=1, num=512, pos_fraction=0.25, neg_pos_ub=-1,
                         add_gt_as_proposals=True),
            pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)),
)
