# PASCAL Context val with all 459 classes (PC-459): 5105 images; 65535 ignored.
# Layout: data/VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext459/*.png (16 bit), ImageSets/SegmentationContext/val.txt,
# pc459_classnames.txt}, written by tools/data/dataset_converters/pascal_context.py --full from the official
# trainval.tar.gz (the class names come from its labels.txt).

_base_ = ["../default_runtime.py", "../ovdense_vit-b16_16bit.py"]

model = dict(classnames="data/VOCdevkit/VOC2010/pc459_classnames.txt")
test_dataloader = dict(
    dataset=dict(
        type="PascalContext459Dataset",
        classnames="data/VOCdevkit/VOC2010/pc459_classnames.txt",
        data_root="data/VOCdevkit/VOC2010",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClassContext459"),
        ann_file="ImageSets/SegmentationContext/val.txt",
    ),
)
