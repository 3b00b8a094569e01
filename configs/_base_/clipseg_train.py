# CLIPSeg training on the shared backbone (ViT-B/16, OpenAI weights): the official recipe of the
# released rd64-uni model (timojl/clipseg experiments/phrasecut.yaml: AdamW 1e-3, cosine to 1e-4
# over 20,000 iterations, batch 64, 352 x 352 inputs, text and visual prompts mixed, 20 % negative
# prompts, binary cross-entropy; AMP on GPU: tools/train.py --amp) on mmengine, from semantic
# segmentation or phrase-grounding data (ovdense/mm/clipseg.py's ClipSegPromptDataset turns each
# sample into a prompt and its mask). A training config in configs/clipseg/ adds its dataset.
#
# Global batch 64 = train_dataloader.batch_size x processes. Exact resume: SeededInfiniteSampler +
# ClipSegPromptDataset + SeededIterBasedTrainLoop (ovdense/mm/training.py); atomic checkpoints.

_base_ = ["./default_runtime.py"]

image_size = 352
model = dict(
    type="OvdenseCLIPSeg",
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    test_classnames=None,  # a class file to segment at test time; None: each test sample's phrase
    head=dict(reduce_dim=64),  # ClipSegConfig: rd64 (refined=True for rd64-refined, 50k iterations)
    data_preprocessor=dict(type="SanDataPreprocessor", size_divisor=image_size),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomChoiceResize", scales=[int(image_size * x * 0.1) for x in range(10, 16)],
         resize_type="ResizeShortestEdge", max_size=4 * image_size),
    dict(type="RandomCrop", crop_size=(image_size, image_size), cat_max_ratio=1.0),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
# a visual prompt's sample: the whole image, fit into the input (ClipSegPromptDataset)
support_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=64,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True),
    # each sample's prompt (text, a visual prompt from another sample, 20 % negatives) from (seed, draw)
    dataset=dict(type="ClipSegPromptDataset", negative_prob=0.2, mix_text_max=0.5,
                 support_pipeline=support_pipeline, dataset=dict(pipeline=train_pipeline)),
)
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

max_iters = 20000
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.01))
param_scheduler = [dict(type="CosineAnnealingLR", T_max=max_iters, eta_min=1e-4, begin=0, end=max_iters,
                        by_epoch=False)]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=2000, max_keep_ckpts=3),
)
custom_hooks = [dict(type="LossCurveHook", interval=100)]
randomness = dict(seed=0, deterministic=False)
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False,
                         broadcast_buffers=False)
