# Cityscapes val: 500 images of 2048x1024, 19 classes; 255 ignored.
# Layout (mmseg's): data/cityscapes/{leftImg8bit/val/<city>/*_leftImg8bit.png, gtFine/val/<city>/*_gtFine_labelTrainIds.png}.

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/cityscapes.txt")
test_dataloader = dict(
    dataset=dict(
        type="CityscapesDataset",
        data_root="data/cityscapes",
        data_prefix=dict(img_path="leftImg8bit/val", seg_map_path="gtFine/val"),
    ),
)
