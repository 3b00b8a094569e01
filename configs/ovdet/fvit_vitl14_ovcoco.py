# F-ViT Faster R-CNN on frozen OpenAI CLIP ViT-L/14 (336 px weights), OV-COCO: the B/16 config with
# F-ViT's L/14 changes.
#
# Recipe: wusize/CLIPSelf F-ViT/configs/ov_coco/fvit_vitl14_upsample_fpn_bs64_3e_ovcoco_eva_original.py:
# taps out_indices (6, 10, 14, 23) of 24 blocks, FPN inputs 1024 wide, strides p/4 … 4p = 3.5, 7, 14,
# 28, 56 (patch 14), box head FC 768, 896 px large-scale jitter; the rest as B/16 (3 epochs at batch
# 64, AdamW 1e-4, wd 0.1, clip 1.0, background weight 0.6, α = 0.1, β = 0.8, T_vlm = 75).
# Departures as in fvit_vitb16_ovcoco.py; OpenAI ViT-L-14-336 instead of EVA02-CLIP-L-14-336 (the
# weights F-ViT used; no OpenAI L/14 OV-COCO figure is published by F-ViT or CLIM).
#
#   torchrun --nproc_per_node 8 tools/train.py configs/ovdet/fvit_vitl14_ovcoco.py --launcher pytorch --amp

_base_ = "fvit_vitb16_ovcoco.py"

strides = [3.5, 7, 14, 28]  # patch 14: p/4, p/2, p, 2p

model = dict(
    clip=dict(name="ViT-L-14-336", pretrained="openai"),
    indices=(6, 10, 14, 23),
    neck=dict(in_channels=[1024] * 4),
    rpn_head=dict(anchor_generator=dict(strides=strides + [56])),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=strides),
        bbox_head=dict(fc_out_channels=768)),
)

image_size = (896, 896)
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
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
