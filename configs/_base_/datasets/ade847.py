# ADE20K-Full val with 847 classes: 2000 images; 65535 ignored.
# Layout (detectron2's datasets/prepare_ade20k_full.py, as SAN, CAT-Seg and CLIPtrase use it):
# data/ADE20K_2021_17_01/{images_detectron2/validation/*.jpg, annotations_detectron2/validation/*.tif (16 bit)};
# class names: configs/_base_/classnames/ade847.txt (the 847 names in label order, with WordNet synonyms).
# The test pipeline does not resize: the segmentor resizes by model.short_side (the official
# Resize(scale=(2048, short_side), keep_ratio=True)) and predicts at the original size, which
# IoUMetric compares with the original ground truth. Method configs in configs/training_free/
# set the method and what the official configs change for this dataset.

_base_ = ["../default_runtime.py"]

model = dict(
    type="OvdenseSegmentor",
    data_preprocessor=dict(type="OvdenseDataPreprocessor"),
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    classnames="{{fileDirname}}/../classnames/ade847.txt",
)

test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations16"),
    dict(type="PackSegInputs"),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type="ADE20K847Dataset",
        classnames="{{fileDirname}}/../classnames/ade847.txt",
        data_root="data/ADE20K_2021_17_01",
        data_prefix=dict(img_path="images_detectron2/validation", seg_map_path="annotations_detectron2/validation"),
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"], ignore_index=65535)
