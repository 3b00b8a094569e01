# CLIPSelf on the shared backbone (Wu et al., ICLR 2024; wusize/CLIPSelf): the tower's own dense features
# learn the class-token embedding of image crops, no labels. The official recipe (its scripts'
# train_clipself_coco_image_patches_*.sh with src/training/main.py): AdamW lr 1e-5, weight decay 0.1
# (none on 1-d tensors: biases and norms), betas (0.9, 0.98), eps 1e-6; 1,000 warm-up steps, then
# cosine to 0; 6 epochs over COCO train2017 (118,287 images, labels unused) at a global batch of 16
# (2 a GPU on 8): 44,358 iterations; AMP on GPU (tools/train.py --amp); every block trains.
# What is saved is alpha * student + (1 - alpha) * teacher (0.7 for 12 blocks, 0.95 for 24):
# WORK_DIR/clipself_backbone.safetensors, for create_backbone(NAME, pretrained=PATH).
# Warm-up: mmengine's LinearLR from 1/1000 (the official: (step + 1) / 1000 of the rate; within 0.1 %).
#
# Global batch = train_dataloader.batch_size x processes. Exact resume: SeededInfiniteSampler +
# SeededIterBasedTrainLoop (ovdense/mm/training.py); each sample's regions from (seed, draw).

_base_ = ["./default_runtime.py"]

model = dict(
    type="OvdenseCLIPSelf",
    clip=dict(name="ViT-B-16", pretrained="openai"),
    alpha=None,  # 0.7 for 12 blocks, 0.95 for 24
)
data_root = "data/coco/"
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    # "grid": image patches; mode="proposals" with a COCO-format file of region proposals
    dataset=dict(type="ClipSelfDataset", data_root=data_root, ann_file="annotations/instances_train2017.json",
                 img_prefix="train2017/", mode="grid", image_size=1024, crop_size=224),
)
max_iters = 44358
warmup = 1000
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
val_cfg = None
val_dataloader = None
test_cfg = None
test_dataloader = None
optim_wrapper = dict(type="OptimWrapper",
                     optimizer=dict(type="AdamW", lr=1e-5, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6),
                     paramwise_cfg=dict(flat_decay_mult=0.0))
param_scheduler = [
    dict(type="LinearLR", start_factor=1.0 / warmup, by_epoch=False, begin=0, end=warmup),
    dict(type="CosineAnnealingLR", T_max=max_iters - warmup, eta_min=0.0, begin=warmup, end=max_iters,
         by_epoch=False),
]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=2000, max_keep_ckpts=3),
)
custom_hooks = [dict(type="LossCurveHook", interval=100), dict(type="ExportClipSelfHook")]
randomness = dict(seed=0, deterministic=False)
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False,
                         broadcast_buffers=False)
