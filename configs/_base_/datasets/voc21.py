# PASCAL VOC 2012 val with background (VOC21): 1449 images, 21 classes; the void band (255) is ignored.
# Layout (mmseg's): data/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt}.
# The test pipeline does not resize: the segmentor resizes by model.short_side (the official
# Resize(scale=(2048, short_side), keep_ratio=True)) and predicts at the original size, which
# IoUMetric compares with the original ground truth. Method configs in configs/training_free/
# set the method and what the official configs change for this dataset.

_base_ = ["../default_runtime.py"]

model = dict(
    type="OvdenseSegmentor",
    data_preprocessor=dict(type="OvdenseDataPreprocessor"),
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    classnames="{{fileDirname}}/../classnames/voc21.txt",
)

test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="PascalVOCDataset",
        data_root="data/VOCdevkit/VOC2012",
        data_prefix=dict(img_path="JPEGImages", seg_map_path="SegmentationClass"),
        ann_file="ImageSets/Segmentation/val.txt",
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
