# PASCAL Context val without background (Context59): 5105 images, 59 classes; label 0 ignored.
# Layout (mmseg's): data/VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt}.

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/context59.txt")
test_dataloader = dict(
    dataset=dict(
        type="PascalContextDataset59",
        data_root="data/VOCdevkit/VOC2010",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassContext"),
        ann_file="ImageSets/SegmentationContext/val.txt",
    ),
)
