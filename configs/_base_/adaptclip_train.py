# AdaptCLIP (Gao et al., AAAI 2026; gaobb/AdaptCLIP): three small adapters on the frozen backbone, trained on
# one anomaly dataset and applied to unseen categories of another. The official recipe
# (scripts/train_adaptclip.sh with train.py): OpenAI ViT-L/14@336 at 518 px, taps 6/12/18/24, n_ctx 12,
# vl_reduction 4, pq_mid_dim 128, pq_context on; Adam lr 1e-3, betas (0.5, 0.999), no schedule, no weight
# decay; batch 8; 15 epochs over the training dataset's TEST split, each image paired with one random
# normal training image of its category; losses per map focal + dice (both channels), per image score
# cross-entropy (ovdense/train/adaptclip.py). WORK_DIR/adaptclip_head.safetensors is the head file.
#
# Global batch = train_dataloader.batch_size x processes. Exact resume: SeededInfiniteSampler +
# SeededIterBasedTrainLoop (ovdense/mm/training.py); each sample's paired normal image from (seed, draw).

_base_ = ["./default_runtime.py"]

model = dict(
    type="OvdenseAdaptClip",
    clip=dict(name="ViT-L-14-336", pretrained="openai"),
    head=dict(image_size=518, n_ctx=12, reduction=4, pq_mid_dim=128, pq_context=True, sigma=4.0),
)
train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(type="AnomalyPairDataset", root="data/mvtec", layout="mvtec", split="test", image_size=518),
)
# 15 epochs of MVTec AD's 1,725 test images at batch 8: 15 x 216 iterations
max_iters = 3240
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
val_cfg = None
val_dataloader = None
test_cfg = None
test_dataloader = None
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="Adam", lr=1e-3, betas=(0.5, 0.999)))
param_scheduler = []
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=216, max_keep_ckpts=3),
)
custom_hooks = [dict(type="LossCurveHook", interval=20), dict(type="ProgressBarHook"),
                dict(type="ExportAdaptClipHook")]
randomness = dict(seed=0, deterministic=False)
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False, broadcast_buffers=False)
