# SAN ViT-B/16 trained on ADE20K-150 (ADEChallengeData2016 training, 20k images) with the official
# COCO-Stuff recipe (the paper trains on COCO-Stuff only; this is for in-domain training).
#   torchrun --nproc_per_node 4 tools/train.py configs/san/san_vit-b16_ade20k-640x640.py \
#      --launcher pytorch --amp
# Layout (mmseg's): data/ade/ADEChallengeData2016/{images,annotations}/{training,validation};
# label 0 (other) is ignored (reduce_zero_label), class k is label k - 1.

_base_ = "../_base_/san_train.py"

model = dict(classnames="{{fileDirname}}/../_base_/classnames/ade150.txt")
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
