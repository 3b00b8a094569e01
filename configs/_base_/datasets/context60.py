# PASCAL Context val with background (Context60): 5105 images, 60 classes.
# Layout (mmseg's): data/VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt}
# (mmseg's own converter, or ours without the Detail API: tools/data/dataset_converters/pascal_context.py).

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/context60.txt")
test_dataloader = dict(
    dataset=dict(
        type="PascalContextDataset",
        data_root="data/VOCdevkit/VOC2010",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassContext"),
        ann_file="ImageSets/SegmentationContext/val.txt",
    ),
)
