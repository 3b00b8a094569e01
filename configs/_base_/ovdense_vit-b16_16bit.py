# ovdense_vit-b16.py for 16-bit label maps (classes beyond 255; 65535 = unlabelled): PC-459, ADE20K-847.

_base_ = ["./ovdense_vit-b16.py"]

test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations16"),
    dict(type="PackSegInputs"),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_evaluator = dict(type="IoUMetric16", ignore_index=65535)  # 16-bit --out PNGs
