# CLIPSelf on the toy CLIP (6 blocks, patch 8, native 64 px), offline on a CPU: the synthetic world's
# training scenes in the F-ViT toy's COCO layout (labels unused) as image patches; the student sees the
# whole 128 px scene (a 16 x 16 token grid), the teacher 64 px crops (the toy's native size).
#   python tools/data/make_synthetic_detection.py --out synthetic/detection --num-train 2000 --num 100
#   python tools/train.py configs/clipself/clipself_toy_synthetic.py  # WORK_DIR/clipself_backbone.safetensors

_base_ = "../_base_/clipself_train.py"

model = dict(clip=dict(_delete_=True, name="toy"), alpha=0.7)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root="synthetic/detection/coco/", img_prefix="train2017/", image_size=128, crop_size=64),
)
max_iters = 1000
warmup = 50
train_cfg = dict(max_iters=max_iters, val_interval=max_iters + 1)
optim_wrapper = dict(optimizer=dict(lr=1e-4))
param_scheduler = [
    dict(type="LinearLR", start_factor=1.0 / warmup, by_epoch=False, begin=0, end=warmup),
    dict(type="CosineAnnealingLR", T_max=max_iters - warmup, eta_min=0.0, begin=warmup, end=max_iters,
         by_epoch=False),
]
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=250, max_keep_ckpts=2))
custom_hooks = [dict(type="LossCurveHook", interval=20), dict(type="ProgressBarHook"),
                dict(type="ExportClipSelfHook")]
