# SAN ViT-L/14-336 trained on ADE20K-150 (ADEChallengeData2016 training, 20k images) with the official
# COCO-Stuff recipe (the paper trains on COCO-Stuff only; this is for in-domain training).
#   torchrun --nproc_per_node 4 tools/train.py configs/san/san_vit-l14_ade20k-640x640.py \
#      --launcher pytorch --amp
# Layout (mmseg's): data/ade/ADEChallengeData2016/{images,annotations}/{training,validation};
# label 0 (other) is ignored (reduce_zero_label), class k is label k - 1.

_base_ = "../_base_/san_train.py"

# ViT-L/14 at 336 px (OpenAI), as configs/san_clip_vit_large_res4_coco.yaml: CLIP sees the image
# at 0.7x (CLIP_RESOLUTION), trunk 18 of 24 blocks, fusion 0/6/12/18 -> 0/1/2/3, 16 bias heads
# (the last three follow from the backbone in SanConfig.resolve).
model = dict(
    backbone=dict(name="ViT-L-14-336", pretrained="openai"),
    head=dict(clip_scale=0.7),
    classnames="{{fileDirname}}/../_base_/classnames/ade150.txt",
)
train_dataloader = dict(
    dataset=dict(dataset=dict(
        type="ADE20KDataset",
        data_root="data/ade/ADEChallengeData2016",
        data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
    )),
)
test_dataloader = dict(
    dataset=dict(
        type="ADE20KDataset",
        data_root="data/ade/ADEChallengeData2016",
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
    ),
)
