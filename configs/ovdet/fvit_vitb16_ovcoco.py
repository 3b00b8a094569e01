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

_base_ = "../_base_/models/fvit_vitb16.py"

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

# the B/16 model of _base_/models/fvit_vitb16.py with this recipe's vocabulary, background weight, β,
# T_vlm and test thresholds
model = dict(
    classes=list(base_classes),
    test_classes=list(all_classes),
    roi_head=dict(bbox_head=dict(
        num_classes=num_base,
        loss_cls=dict(class_weight=[1.0] * num_base + [0.6]),  # F-ViT OV-COCO: bg_weight=0.6
        beta=0.8, vlm_temperature=75.0)),
    test_cfg=dict(rcnn=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.4), max_per_img=100)),
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
