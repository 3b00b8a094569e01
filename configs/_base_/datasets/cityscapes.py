# Cityscapes val: 500 images of 2048x1024, 19 classes; 255 ignored.
# Layout (mmseg's): data/cityscapes/{leftImg8bit/val/<city>/*_leftImg8bit.png, gtFine/val/<city>/*_gtFine_labelTrainIds.png}.
# The test pipeline does not resize: the segmentor resizes by model.short_side (the official
# Resize(scale=(2048, short_side), keep_ratio=True)) and predicts at the original size, which
# IoUMetric compares with the original ground truth. Method configs in configs/training_free/
# set the method and what the official configs change for this dataset.

_base_ = ["../default_runtime.py"]

model = dict(
    type="OvdenseSegmentor",
    data_preprocessor=dict(type="OvdenseDataPreprocessor"),
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    classnames="{{fileDirname}}/../classnames/cityscapes.txt",
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
        type="CityscapesDataset",
        data_root="data/cityscapes",
        data_prefix=dict(img_path="leftImg8bit/val", seg_map_path="gtFine/val"),
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
