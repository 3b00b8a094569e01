# F-ViT Mask R-CNN on frozen OpenAI CLIP ViT-L/14 (336 px weights), OV-LVIS: the B/16 config with
# F-ViT's L/14 changes.
#
# Recipe: wusize/CLIPSelf F-ViT/configs/ov_lvis/fvit_vitl14_upsample_fpn_bs64_4x_ovlvis_eva_original.py:
# taps out_indices (6, 10, 14, 23) of 24 blocks, FPN inputs 1024 wide, strides 3.5, 7, 14, 28, 56
# (patch 14), box head FC 768, 896 px large-scale jitter, β = 0.4 (its comment: "a larger beta can
# significantly increase APr, e.g., setting beta=0.6 or 0.8"); the rest as B/16 (48 epochs at batch 64,
# T_vlm = 50, α = 0.1, background weight 0.9, steps at epochs 32 and 44). Departures as in
# fvit_vitb16_ovlvis.py; OpenAI ViT-L-14-336 instead of EVA02-CLIP-L-14-336.
#
#   python tools/data/dataset_converters/lvis_v1_ovd.py data/lvis_v1/annotations/lvis_v1_train.json
#   torchrun --nproc_per_node 8 tools/train.py configs/ovdet/fvit_vitl14_ovlvis.py --launcher pytorch --amp

_base_ = "fvit_vitb16_ovlvis.py"

strides = [3.5, 7, 14, 28]  # patch 14: p/4, p/2, p, 2p

model = dict(
    clip=dict(name="ViT-L-14-336", pretrained="openai"),
    indices=(6, 10, 14, 23),
    neck=dict(in_channels=[1024] * 4),
    rpn_head=dict(anchor_generator=dict(strides=strides + [56])),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=strides),
        bbox_head=dict(fc_out_channels=768, beta=0.4),
        mask_roi_extractor=dict(featmap_strides=strides)),
)

image_size = (896, 896)
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
train_dataloader = dict(dataset=dict(dataset=dict(pipeline=train_pipeline)))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
