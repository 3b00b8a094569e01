# PASCAL VOC 2012 val without background (VOC20): 1449 images, 20 classes; background and void ignored.
# Layout (mmseg's): data/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt}.

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/voc20.txt")
test_dataloader = dict(
    dataset=dict(
        type="PascalVOC20Dataset",
        data_root="data/VOCdevkit/VOC2012",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        ann_file="ImageSets/Segmentation/val.txt",
    ),
)
