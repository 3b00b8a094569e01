# ADE20K val (ADEChallengeData2016): 2000 images, 150 classes; label 0 (other) ignored.
# Layout (mmseg's): data/ade/ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}.
# The test pipeline does not resize: the segmentor resizes by model.short_side (the official
# Resize(scale=(2048, short_side), keep_ratio=True)) and predicts at the original size, which
# IoUMetric compares with the original ground truth. Method configs in configs/training_free/
# set the method and what the official configs change for this dataset.

_base_ = ["../default_runtime.py"]

model = dict(
    type="OvdenseSegmentor",
    data_preprocessor=dict(type="OvdenseDataPreprocessor"),
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    classnames="{{fileDirname}}/../classnames/ade150.txt",
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
        type="ADE20KDataset",
        data_root="data/ade/ADEChallengeData2016",
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
