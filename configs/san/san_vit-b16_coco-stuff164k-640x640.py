# SAN ViT-B/16 trained on COCO-Stuff-171 (train2017, 118k images), the official recipe: 60k
# iterations, global batch 32 (4 GPUs x 8; see configs/_base_/san_train.py), AdamW 1e-4, poly 0.9.
#   torchrun --nproc_per_node 4 tools/train.py configs/san/san_vit-b16_coco-stuff164k-640x640.py \
#      --launcher pytorch --amp
# Layout (mmseg's): data/coco_stuff164k/{images,annotations}/{train2017,val2017}, *_labelTrainIds.png.

_base_ = "../_base_/san_train.py"

model = dict(classnames="{{fileDirname}}/../_base_/classnames/coco_stuff.txt")
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
