# COCO-Stuff-171 val2017 (164k version): 5000 images, 171 classes; 255 ignored.
# Layout (mmseg's): data/coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png}
# (mmseg's coco_stuff164k.py or tools/dataset_converters/coco_stuff.py).
# The test pipeline does not resize: the segmentor resizes by model.short_side (the official
# Resize(scale=(2048, short_side), keep_ratio=True)) and predicts at the original size, which
# IoUMetric compares with the original ground truth. Method configs in configs/training_free/
# set the method and what the official configs change for this dataset.

_base_ = ["../default_runtime.py"]

model = dict(
    type="OvdenseSegmentor",
    data_preprocessor=dict(type="OvdenseDataPreprocessor"),
    backbone=dict(name="ViT-B-16", pretrained="openai"),
    classnames="{{fileDirname}}/../classnames/coco_stuff.txt",
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
        type="COCOStuffDataset",
        data_root="data/coco_stuff164k",
        data_prefix=dict(img_path="images/val2017", seg_map_path="annotations/val2017"),
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
