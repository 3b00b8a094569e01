# SAN training on the shared backbone (ViT-B/16, OpenAI weights): the official recipe
# (MendelXu/SAN configs/Base-coco-stuff-164K-171.yaml + san_clip_vit_res4_coco.yaml, Mask2Former's
# solver defaults) on mmengine. A training config in configs/san/ adds its dataset and class file.
#
# Global batch 32 = train_dataloader.batch_size x processes: 4 GPUs x 8 (as here), 8 GPUs x 4
# (--cfg-options train_dataloader.batch_size=4), one GPU x 32. Mixed precision: tools/train.py --amp.
# Exact resume: every random choice of an iteration derives from (randomness.seed, global sample
# index) through SeededInfiniteSampler + SeededDataset + SeededIterBasedTrainLoop
# (ovdense/mm/training.py); checkpoints are written atomically (AtomicCheckpointHook).

_base_ = ["./default_runtime.py"]

crop_size = (640, 640)
model = dict(
    type="OvdenseSAN",
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    classnames=None,  # the training class file, in the dataset's label order
    head=dict(),  # SanConfig fields; the defaults are the official ViT-B/16 ones
    criterion=dict(),  # SanCriterion: the official weights (2/5/5, void 0.1, 12544 points)
    # the official SIZE_DIVISIBILITY 640 of the dataset mapper: pad every crop to 640 x 640
    data_preprocessor=dict(type="SanDataPreprocessor", size_divisor=640),
    short_side=640,  # MIN_SIZE_TEST; the long side is capped at 2560 (MAX_SIZE_TEST)
)

# MaskFormerSemanticDatasetMapper: ResizeShortestEdge choice over 0.5-1.5 x 640 (max 2560), a
# 640 crop (SINGLE_CATEGORY_MAX_AREA 1.0 = no category constraint), colour augmentation
# (COLOR_AUG_SSD = PhotoMetricDistortion), horizontal flip.
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomChoiceResize", scales=[int(640 * x * 0.1) for x in range(5, 16)],
         resize_type="ResizeShortestEdge", max_size=2560),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=1.0),
    dict(type="PhotoMetricDistortion"),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True),  # batch_size filled in by tools/train.py
    dataset=dict(type="SeededDataset", dataset=dict(pipeline=train_pipeline)),
)
# evaluation after training: tools/test.py CONFIG --checkpoint WORK_DIR/iter_60000.pth (whole
# image, short side 640; the segmentor resizes, so the test pipeline does not)
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(pipeline=test_pipeline),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])

max_iters = 60000
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
# AdamW 1e-4, weight decay 1e-4 except norms and the position/query embeddings
# (WEIGHT_DECAY_NORM 0, WEIGHT_DECAY_EMBED_GROUP), the same learning rate everywhere
# (BACKBONE_MULTIPLIER 1.0; mmseg gives its CLIP position embedding 0.1x), full-model
# gradient-norm clipping at 0.01.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=dict(max_norm=0.01, norm_type=2),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={
            "pos_embed": dict(decay_mult=0.0),  # side and CLIP position embeddings, query_pos_embed
            "query_embed": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),  # LayerNorm2d of the fusion layers
        },
    ),
)
# WarmupPolyLR without warm-up, power 0.9 (Mask2Former's POLY_LR_POWER; mmseg's SAN config
# uses power 1.0: ovdense follows the official code)
param_scheduler = [dict(type="PolyLR", power=0.9, eta_min=0.0, begin=0, end=max_iters, by_epoch=False)]

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=5000, max_keep_ckpts=3),
)
custom_hooks = [dict(type="LossCurveHook", interval=100)]
randomness = dict(seed=0, deterministic=False)
# training wraps the model in DDP (the head trains; the frozen backbone is no parameter)
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False,
                         broadcast_buffers=False)
