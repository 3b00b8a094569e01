# F-ViT Mask R-CNN on the toy CLIP (6 blocks, patch 8) in the synthetic open-vocabulary world.
#
#   python tools/data/make_synthetic_detection.py --out synthetic/detection --num-train 2000 --num 100
#   python tools/train.py configs/ovdet/fvlm_toy_synthetic.py      # data_root: synthetic/detection/coco/
#
# Trains on the 20 base colour–shape pairs only (the training json has no novel label; the
# training vocabulary has no novel name); evaluates on all 30 pairs with OVCocoMetric (box and mask
# AP, base_ap50 / novel_ap50). The recipe is F-ViT's (Wu et al., CLIPSelf, ICLR 2024; wusize/CLIPSelf
# F-ViT/configs/ov_coco/fvit_vitb16_upsample_fpn_bs64_3e_ovcoco_eva_original.py) shrunk to the toy:
# strides halve with the patch (2, 4, 8, 16, 32), FPN width 64, GroupNorm instead of SyncBN (one CPU),
# fewer RoIs per image, RoIAlign through torchvision's op (``use_torchvision``: the same values and
# gradients as mmcv's, measured; its CPU forward is about twice as fast).
# model.roi_head.bbox_head.ensemble=False gives the detector's scores without the CLIP term.

default_scope = "mmdet"
custom_imports = dict(imports=["ovdense.mm.detection", "ovdense.mm.training"], allow_failed_imports=False)

base_classes = [
    "red square", "red triangle", "red ring", "green circle", "green square", "green star",
    "green ring", "blue circle", "blue triangle", "blue star", "yellow square", "yellow triangle",
    "yellow ring", "purple circle", "purple square", "purple star", "purple ring", "orange circle",
    "orange triangle", "orange star",
]  # ovdense.data.synthetic.open_vocabulary_split()[0]
novel_classes = [
    "red circle", "red star", "green triangle", "blue square", "blue ring", "yellow circle",
    "yellow star", "purple triangle", "orange square", "orange ring",
]  # ... [1]: (colour + shape index) mod 3 = 0
all_classes = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
               for s in ("circle", "square", "triangle", "star", "ring")]  # colour_shape_classes()[1:]
num_base = len(base_classes)
norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)  # F-ViT: SyncBN (several GPUs)
fpn_width = 64

model = dict(
    type="OvdenseFViT",
    clip=dict(name="toy"),
    classes=base_classes,
    test_classes=all_classes,
    method="maskclip",
    pyramid=dict(norm="group", num_groups=32),
    neck=dict(type="FPN", in_channels=[192] * 4, out_channels=fpn_width, num_outs=5, norm_cfg=norm_cfg),
    rpn_head=dict(
        type="RPNHead", in_channels=fpn_width, feat_channels=fpn_width, num_convs=1,
        anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                              strides=[2, 4, 8, 16, 32]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
    roi_head=dict(
        type="OvdenseFViTRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0,
                                                    use_torchvision=True),
            out_channels=fpn_width, featmap_strides=[2, 4, 8, 16], finest_scale=28),
        bbox_head=dict(
            type="OvdenseFViTBBoxHead", in_channels=fpn_width, conv_out_channels=fpn_width,
            fc_out_channels=256, roi_feat_size=7, num_classes=num_base,
            num_shared_convs=0, num_shared_fcs=2, num_cls_fcs=1, num_reg_fcs=1, norm_cfg=norm_cfg,
            reg_class_agnostic=True,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0,
                          class_weight=[1.0] * num_base + [0.6]),  # F-ViT's background weight
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            alpha=0.1, beta=0.8, vlm_temperature=None, temperature=50.0),  # None: the toy's own logit scale
        mask_roi_extractor=dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0,
                                                    use_torchvision=True),
            out_channels=fpn_width, featmap_strides=[2, 4, 8, 16], finest_scale=28),
        mask_head=dict(
            type="FCNMaskHead", num_convs=2, in_channels=fpn_width, conv_out_channels=fpn_width,
            num_classes=num_base, class_agnostic=True, norm_cfg=norm_cfg,
            loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type="SeededRandomSampler", stream=0, num=256, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
            allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=1000, max_per_img=500, nms=dict(type="nms", iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type="SeededRandomSampler", stream=1, num=128, pos_fraction=0.25, neg_pos_ub=-1,
                         add_gt_as_proposals=True),
            mask_size=28, pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.4), max_per_img=100,
                  mask_thr_binary=0.5)),
)

data_root = "synthetic/detection/coco/"
backend_args = None
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="Resize", scale=(128, 128), keep_ratio=True),  # the toy's scenes are 128 px: sets scale_factor
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True, batch_size=8),
    dataset=dict(type="SeededDataset", dataset=dict(
        type="CocoDataset", data_root=data_root, ann_file="annotations/instances_train2017.json",
        data_prefix=dict(img="train2017/"), metainfo=dict(classes=tuple(base_classes)),
        filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline,
        backend_args=backend_args)),
)
val_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="CocoDataset", data_root=data_root, ann_file="annotations/instances_val2017.json",
        data_prefix=dict(img="val2017/"), test_mode=True, pipeline=test_pipeline, backend_args=backend_args,
        metainfo=dict(classes=tuple(all_classes), base_classes=tuple(base_classes),
                      novel_classes=tuple(novel_classes))),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="OVCocoMetric", ann_file=data_root + "annotations/instances_val2017.json",
                     metric=["bbox", "segm"], format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

max_iters = 900  # 1.95 s per iteration of 8 on 2 idle CPU cores: 29 min 15 s for the shipped head
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=dict(max_norm=1.0, norm_type=2))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, milestones=[int(0.8 * max_iters)],
         gamma=0.1),
]
randomness = dict(seed=0)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=300, max_keep_ckpts=3),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
custom_hooks = [dict(type="LossCurveHook", interval=50), dict(type="ProgressBarHook"),
                dict(type="ExportFViTHeadHook", dtype="float16")]  # WORK_DIR/fvit_head.safetensors (fp16)
# DDP over the head (the frozen backbone is no parameter); tools/train.py drops device_ids on CPU
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False,
                         broadcast_buffers=False)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=20, by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
