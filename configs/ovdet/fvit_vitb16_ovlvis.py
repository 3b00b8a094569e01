# F-ViT Mask R-CNN on frozen OpenAI CLIP ViT-B/16, OV-LVIS (866 base = frequent + common, 337 rare
# novel), evaluated by mask AP on the rare categories (lvis/segm_APr of mmdet's LVISMetric).
#
# Recipe: wusize/CLIPSelf F-ViT/configs/ov_lvis/fvit_vitb16_upsample_fpn_bs64_4x_ovlvis_eva_original.py
# (mmdet 2.28): taps (3, 5, 7, 11), FPN 256, RPN with 2 convs, 4conv2fc box head (FC 512), τ = 50
# learned, background weight 0.9, rare classes out of the loss (class weight 0 from
# lvis_v1_train_cat_norare_info.json), ensemble α = 0.1, β = 0.6, T_vlm = 50; class-agnostic
# FCNMaskHead (4 convs, 28×28 targets); rcnn assigner with match_low_quality=True; test score
# threshold 1e-4, NMS 0.5, 300 detections per image (LVIS's AP counts 300); 1024 px large-scale
# jitter (ratio 0.1–2.0, crop, pad); 48 epochs at global batch 64 (8 × 8), AdamW 1e-4, weight decay
# 0.1, gradient clip 1.0, 250 warm-up iterations from 0.001, ×0.1 at epochs 32 and 44, fp16 (--amp).
# Plain sampling: F-ViT's LVISV1DatasetOV has no repeat-factor sampling and its loss is a softmax
# cross-entropy, not the federated loss (CLIM's mmdet 3.x port, wusize/CLIM ovdet/configs/_base_/
# datasets/lvis_v1_ovd_base_lsj.py, inherits mmdet's ClassBalancedDataset(oversample_thr=1e-3);
# to try it, wrap the inner dataset: train_dataloader.dataset.dataset=dict(type="ClassBalancedDataset",
# oversample_thr=1e-3, dataset=<the OvdenseLVISV1Dataset below>)).
# Departures: GroupNorm instead of SyncBN in the pyramid, FPN, box and mask heads (one device
# works too); no norm in the RPN convs (F-ViT's CustomRPNHead has MMSyncBN; mmdet 3.3's RPNHead
# has none); rare classes absent from the training vocabulary instead of masked (same gradients);
# SeededRandomSampler for anchors and RoIs (mmdet's RandomSampler seeded per image: exact resume);
# OpenAI weights instead of EVA-02 (anchor, CLIM README: mask APr 24.3 with CLIM-refined OpenAI
# ViT-B/16, pass them as clip.pretrained=/path/to/openai_vitb16_cc3m_clim.pt; F-ViT EVA-02 B/16
# with CLIPSelf: 25.3).
#
# Data: LVIS v1 under data/lvis_v1/ (annotations/lvis_v1_{train,val}.json; train2017/ and val2017/,
# COCO 2017's images), then
#   python tools/data/dataset_converters/lvis_v1_ovd.py data/lvis_v1/annotations/lvis_v1_train.json
# writes annotations/lvis_v1_train_base.json and the two class files read below (and prints the
# exact max_iters for your json). mmdet's LVISV1Dataset and LVISMetric need the lvis package: ovdense's
# OvdenseLVISV1Dataset / OvdenseLVISMetric (ovdense/mm/lvis.py) are those two, refusing a missing or
# broken lvis when they are built on the data (a warning naming the fix where the data is absent).
#   torchrun --nproc_per_node 8 tools/train.py configs/ovdet/fvit_vitb16_ovlvis.py --launcher pytorch --amp
#   python tools/test.py configs/ovdet/fvit_vitb16_ovlvis.py \
#       --checkpoint work_dirs/fvit_vitb16_ovlvis/iter_75168.pth


_base_ = "../_base_/models/fvit_vitb16.py"

default_scope = "mmdet"
custom_imports = dict(imports=["ovdense.mm.detection", "ovdense.mm.training", "ovdense.mm.lvis"],
                      allow_failed_imports=False)

data_root = "data/lvis_v1/"
base_classes = data_root + "annotations/lvis_v1_base_classes.txt"  # tools/data/dataset_converters/lvis_v1_ovd.py
all_classes = data_root + "annotations/lvis_v1_all_classes.txt"  # category-id order = lvis_v1_val.json's
num_base = 866  # LVIS v1 frequent (405) + common (461)

# the B/16 model of _base_/models/fvit_vitb16.py with this recipe's vocabulary, background weight, β,
# T_vlm, mask head, rcnn assigner and test thresholds
model = dict(
    classes=base_classes,
    test_classes=all_classes,
    roi_head=dict(
        bbox_head=dict(
            num_classes=num_base,
            loss_cls=dict(class_weight=[1.0] * num_base + [0.9]),  # F-ViT LVIS: bg_weight=0.9
            beta=0.6, vlm_temperature=50.0),
        mask_roi_extractor=dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
            out_channels=256, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type="FCNMaskHead", num_convs=4, in_channels=256, conv_out_channels=256,
            num_classes=num_base, class_agnostic=True, norm_cfg={{_base_.norm_cfg}},
            loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
    train_cfg=dict(rcnn=dict(assigner=dict(match_low_quality=True), mask_size=28)),
    test_cfg=dict(rcnn=dict(score_thr=0.0001, nms=dict(type="nms", iou_threshold=0.5), max_per_img=300,
                            mask_thr_binary=0.5)),
)

image_size = (1024, 1024)
backend_args = None
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
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
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="Pad", size=image_size),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True, batch_size=8),
    dataset=dict(type="SeededDataset", dataset=dict(
        type="OvdenseLVISV1Dataset", data_root=data_root, ann_file="annotations/lvis_v1_train_base.json",
        data_prefix=dict(img=""),  # file names come from coco_url: train2017/…, val2017/…
        filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=train_pipeline,
        backend_args=backend_args)),
)
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="OvdenseLVISV1Dataset", data_root=data_root, ann_file="annotations/lvis_v1_val.json",
        data_prefix=dict(img=""), test_mode=True, pipeline=test_pipeline, backend_args=backend_args),
)
test_dataloader = val_dataloader
# F-ViT evaluates masks only (evaluation metric=['segm']); lvis/segm_APr is the novel (rare) AP
val_evaluator = dict(type="OvdenseLVISMetric", ann_file=data_root + "annotations/lvis_v1_val.json",
                     metric=["segm"], backend_args=backend_args)
test_evaluator = val_evaluator

# 48 epochs of LVIS v1's 100,170 training images at global batch 64 (images whose only annotations
# are rare drop out: tools/data/dataset_converters/lvis_v1_ovd.py prints the exact count for your json)
iters_per_epoch = 1566
max_iters = 48 * iters_per_epoch
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=dict(max_norm=1.0, norm_type=2))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters,
         milestones=[32 * iters_per_epoch, 44 * iters_per_epoch], gamma=0.1),
]
auto_scale_lr = dict(enable=True, base_batch_size=64)
randomness = dict(seed=0)

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=iters_per_epoch, max_keep_ckpts=2),
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
