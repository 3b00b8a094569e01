# The ovdense segmentor on ViT-B/16 (OpenAI weights) and the test loader every benchmark shares.
# The test pipeline does not resize: the segmentor resizes by model.short_side (the official
# Resize(scale=(2048, short_side), keep_ratio=True)) and predicts at the original size, which
# IoUMetric compares with the original ground truth. Each dataset base in datasets/ adds its
# class file and dataset; method configs in configs/training_free/ set the method and what the
# official configs change for that dataset.

model = dict(
    type="OvdenseSegmentor",
    data_preprocessor=dict(type="OvdenseDataPreprocessor"),
    backbone=dict(name="ViT-B-16", pretrained="openai"),
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
    dataset=dict(pipeline=test_pipeline),
)
test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
