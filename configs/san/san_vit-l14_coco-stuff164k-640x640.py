# SAN ViT-L/14-336 trained on COCO-Stuff-171 (train2017, 118k images), the official recipe: 60k
# iterations, global batch 32 (4 GPUs x 8; see configs/_base_/san_train.py), AdamW 1e-4, poly 0.9.
#   torchrun --nproc_per_node 4 tools/train.py configs/san/san_vit-l14_coco-stuff164k-640x640.py \
#      --launcher pytorch --amp
# Layout (mmseg's): data/coco_stuff164k/{images,annotations}/{train2017,val2017}, *_labelTrainIds.png.

_base_ = "../_base_/san_train.py"

# ViT-L/14 at 336 px (OpenAI), as configs/san_clip_vit_large_res4_coco.yaml: CLIP sees the image
# at 0.7x (CLIP_RESOLUTION), trunk 18 of 24 blocks, fusion 0/6/12/18 -> 0/1/2/3, 16 bias heads
# (the last three follow from the backbone in SanConfig.resolve).
model = dict(
    backbone=dict(name="ViT-L-14-336", pretrained="openai"),
    head=dict(clip_scale=0.7),
    classnames="{{fileDirname}}/../_base_/classnames/coco_stuff.txt",
)
train_dataloader = dict(
    dataset=dict(dataset=dict(
        type="COCOStuffDataset",
        data_root="data/coco_stuff164k",
        data_prefix=dict(img_path="images/train2017", seg_map_path="annotations/train2017"),
    )),
)
test_dataloader = dict(
    dataset=dict(
        type="COCOStuffDataset",
        data_root="data/coco_stuff164k",
        data_prefix=dict(img_path="images/val2017", seg_map_path="annotations/val2017"),
    ),
)
