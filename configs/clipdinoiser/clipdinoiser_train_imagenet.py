# CLIP-DINOiser's training (Wysoczanska et al., ECCV 2024; wysoczanska/clip_dinoiser train.py with
# configs/clip_dinoiser.yaml): the two convolutions of ovdense/heads/clipdinoiser.py on the frozen
# ViT-B-16 laion2b_s34b_b88k, taught by DINO ViT-B/16 (last-block value correlations >= 0.2) and FOUND
# (DINO ViT-S/8 keys -> its 1x1 decoder -> sigmoid -> 28 x 28 -> > 0.5); loss = BCE(dino) + BCE(found).
# Official: 1000 ImageNet train images drawn with replacement (np seed 0); ToTensor -> Resize(448) ->
# RandomCrop(448) -> HorizontalFlip(0.5) -> ColorJitter(brightness 0.5); batch 16; 100 epochs (63
# iterations each, 6300); AdamW, obj_proj lr 5e-5, bkg_decoder lr 1e-2, weight decay 0.01 (torch's
# defaults: betas (0.9, 0.999), eps 1e-8); lr x 0.1 from iteration 5000 (stepped per iteration).
#   python tools/train.py configs/clipdinoiser/clipdinoiser_train_imagenet.py \
#       --cfg-options model.dino.weights=PATH/dino_vitbase16_pretrain.pth \
#       model.found.weights=PATH/dino_deitsmall8_300ep_pretrain.pth \
#       model.found.decoder=PATH/FOUND/data/weights/decoder_weights.pt
#   -> WORK_DIR/clipdinoiser_head.safetensors, for ovdense segment --method clipdinoiser --head-checkpoint
# Departures (docs/clipdinoiser_training.md): the draws' order and augmentations come from (seed, draw),
# not torch's global generator; batches run across epoch ends (6300 full batches of 16 = 100.8 passes,
# where the official's last batch of each epoch holds 8); images are read with EXIF orientation applied.

_base_ = ["../_base_/default_runtime.py"]

model = dict(
    type="OvdenseClipDinoiser",
    clip=dict(name="ViT-B-16", pretrained="laion2b_s34b_b88k"),
    head=dict(tap=-3, proj_dim=256, kernel=3),
    dino=dict(name="dino_vitb16", weights=None, kind="v"),  # dino_vitbase16_pretrain.pth
    found=dict(name="dino_vits8", weights=None, kind="k", decoder=None),  # + FOUND's decoder_weights.pt
    gamma=0.2,
    antialias=False,  # torchvision 0.13.1 (the official README's): tensor resizes without antialias
)
data_root = "data/imagenet/"
batch_size = 16
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="SeededInfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(type="ImageNetSubsetDataset", data_root=data_root, split="train", size=1000, subset_seed=0,
                 image_size=448, antialias=False),
)
max_iters = 6300  # 100 epochs x ceil(1000 / 16)
train_cfg = dict(type="SeededIterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
val_cfg = None
val_dataloader = None
test_cfg = None
test_dataloader = None
corr_lr, found_lr = 5e-5, 1e-2
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=corr_lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8),
    paramwise_cfg=dict(custom_keys={"head.bkg_decoder": dict(lr_mult=found_lr / corr_lr)}),
)
param_scheduler = [dict(type="MultiStepLR", milestones=[5000], gamma=0.1, by_epoch=False, begin=0,
                        end=max_iters)]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="AtomicCheckpointHook", by_epoch=False, interval=1000, max_keep_ckpts=2),
)
custom_hooks = [dict(type="LossCurveHook", interval=50), dict(type="ExportClipDinoiserHeadHook")]
randomness = dict(seed=0, deterministic=False)
model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=False,
                         broadcast_buffers=False)
