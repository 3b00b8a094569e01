# PASCAL VOC 2012 val with background (VOC21): 1449 images, 21 classes; the void band (255) is ignored.
# Layout (mmseg's): data/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt}.

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/voc21.txt")
test_dataloader = dict(
    dataset=dict(
        type="PascalVOCDataset",
        data_root="data/VOCdevkit/VOC2012",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        ann_file="ImageSets/Segmentation/val.txt",
    ),
)
