# F-ViT Faster R-CNN on frozen OpenAI CLIP ViT-B/16, OV-COCO (48 base / 17 novel, the OVR-CNN split).
#
# Recipe: wusize/CLIPSelf F-ViT/configs/ov_coco/fvit_vitb16_upsample_fpn_bs64_3e_ovcoco_eva_original.py
# and its mmdet 3.x port wusize/CLIM ovdet/configs/clip_based/openai_vitb16/
# faster_rcnn_fpn_openai_vitb16_clim_bs64_ov_coco_3e.py: 640 px large-scale jitter, 3 epochs at global
# batch 64, AdamW 1e-4, weight decay 0.1, gradient clip 1.0, AMP on GPU; taps (3, 5, 7, 11), 4conv2fc
# box head, τ = 50 learned, background class weight 0.6, ensemble α = 0.1, β = 0.8, T_vlm = 75.
# Departures: GroupNorm instead of SyncBN (runs on one device too); the novel classes are absent from the
# training vocabulary instead of masked with class weight 0 (same gradients: masked logits get none).
# RoIs and anchors are sampled by SeededRandomSampler (mmdet's RandomSampler seeded per image: a resumed
# run and any number of processes sample what one uninterrupted process samples).
# Anchor (CLIM README): novel AP50 29.7 with CLIM-refined OpenAI ViT-B/16 weights (pass them as
# clip.pretrained=/path/to/openai_vitb16_coco_clim.pt); stock OpenAI weights score lower (not measured here).
#
# Data: COCO 2017 under data/coco/, then mmdet 3.3's converter (mmdet/.mim/tools/dataset_converters/
# coco2ovd.py data/coco/) writes annotations/instances_train2017_seen_2.json and instances_val2017_all_2.json.
#   torchrun --nproc_per_node 8 tools/train.py configs/ovdet/fvit_vitb16_ovcoco.py --launcher pytorch --amp
#   (8 processes × 8 images = the official batch 64; on fewer GPUs raise train_dataloader.batch_size)

default_scope = "mmdet"
custom_imports = dict(imports=["ovdense.mm.detection", "ovdense.mm.training"], allow_failed_imports=False)

base_classes = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
    "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
    "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza",
    "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush",
)  # mmdet coco2ovd.py, COCO order
novel_classes = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup",
    "knife", "cake", "couch", "keyboard", "sink", "scissors",
)
all_classes = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "kite", "skateboard", "surfboard", "bottle",
    "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "pizza", "donut", "cake", "chair", "couch", "bed", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "toothbrush",
)  # COCO order: the dataset's label order
num_base = len(base_classes)
norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)

model = dict(
    type="OvdenseFViT",
    clip=dict(name="ViT-B-16", pretrained="openai"),
    classes=list(base_classes),
    test_classes=list(all_classes),
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
            roi_feat_size=7, num_classes=num_base, num_shared_convs=4, num_shared_fcs=2, num_cls_fcs=1,
            num_reg_fcs=1, norm_cfg=norm_cfg, reg_class_agnostic=True,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0,
                          class_weight=[1.0] * num_base + [0.6]),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            alpha=0.1, beta=0.8, vlm_temperature=75.0, temperature=50.0)),
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
        rpn=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.4), max_per_img=100)),
)

data_root = "data/coco/"
image_size = (640, 640)
backend_args = None
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="RandomResize", scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_type="absolute_range", crop_size=image_size, recompute_bbox=True,
         allow_negative_crop=True),
    dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type="RandomFlip", prob=0.5),
    dict(type="Pad", size=image_size),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="Pad", size=image_size),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True, batch_size=8),
    dataset=dict(type="SeededDataset", dataset=dict(
        type="CocoDataset", data_root=data_root, ann_file="annotations/instances_train2017_seen_2.json",
        data_prefix=dict(img="train2017/"), metainfo=dict(classes=base_classes),
        filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=train_pipeline,
        backend_args=backend_args)),
)
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="CocoDataset", data_root=data_root, ann_file="annotations/instances_val2017_all_2.json",
        data_prefix=dict(img="val2017/"), test_mode=True, pipeline=test_pipeline, backend_args=backend_args,
        metainfo=dict(classes=all_classes, base_classes=base_classes, novel_classes=novel_classes)),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="OVCocoMetric", ann_file=data_root + "annotations/instances_val2017_all_2.json",
                     metric="bbox", format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

max_iters = 5052  # 3 epochs of the 107,761 base-annotated training images at global batch 64
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=dict(max_norm=1.0, norm_type=2))
param_scheduler = [dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=250)]
auto_scale_lr = dict(enable=True, base_batch_size=64)
randomness = dict(seed=0)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=1000, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
custom_hooks = [dict(type="LossCurveHook", interval=50), dict(type="ProgressBarHook"),
                dict(type="ExportFViTHeadHook")]  # WORK_DIR/fvit_head.safetensors, for Detector
# DDP over the head (the frozen backbone is no parameter); tools/train.py drops device_ids on CPU
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False,
                         broadcast_buffers=False)
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
