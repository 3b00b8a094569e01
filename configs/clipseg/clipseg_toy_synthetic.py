# CLIPSeg on the toy backbone in the open-vocabulary toy world, offline on a CPU: trained on the 20
# *base* colour-shape pairs of 2,000 synthetic scenes (novel objects are ignored pixels), text and
# visual prompts mixed, evaluated per prompt on held-out scenes with all 30 pairs:
#   python tools/data/make_synthetic_benchmarks.py --san-toy --out synthetic_san --num-train 2000 --num 100
#   python tools/train.py configs/clipseg/clipseg_toy_synthetic.py   # writes WORK_DIR/clipseg_head.safetensors
# The toy's own input size (128: its 64 px windows over scenes twice that size) and its templates
# (its training wording); the official decoder (D = 64, three blocks, FFN 2048) otherwise.

_base_ = "../_base_/clipseg_train.py"

data_root = "synthetic_san/data"
image_size = 128
max_iters = 1000  # 1.55 s an iteration of 32 on 2 CPU cores: ~26 min
model = dict(
    backbone=dict(_delete_=True, name="toy"),
    test_classnames="{{fileDirname}}/../_base_/classnames/toy_all.txt",  # background + all 30 pairs
    head=dict(image_size=image_size),
    data_preprocessor=dict(size_divisor=image_size),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomChoiceResize", scales=[int(image_size * x * 0.1) for x in range(10, 16)],
         resize_type="ResizeShortestEdge", max_size=4 * image_size),
    dict(type="RandomCrop", crop_size=(image_size, image_size), cat_max_ratio=1.0),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
support_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    # a fifth of the prompts by text alone: the toy's 20 class names always have other samples to
    # lend a visual prompt, where PhraseCut's unique phrases leave a text-only share
    dataset=dict(templates=["a photo of a {}"], support_pipeline=support_pipeline, text_only_prob=0.2,
                 dataset=dict(
        _delete_=True,
        type="ClassFileDataset",
        classnames="{{fileDirname}}/../_base_/classnames/toy_base.txt",
        data_root=data_root + "/coco_stuff164k",
        data_prefix=dict(img_path="images/train2017", seg_map_path="annotations/train2017"),
        seg_map_suffix="_labelTrainIds.png",
        pipeline=train_pipeline,
    )),
)
test_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type="ClassFileDataset",
        classnames="{{fileDirname}}/../_base_/classnames/toy_all.txt",
        data_root=data_root + "/ade/ADEChallengeData2016",
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
    ),
)
train_cfg = dict(max_iters=max_iters, val_interval=max_iters + 1)
param_scheduler = [dict(type="CosineAnnealingLR", T_max=max_iters, eta_min=1e-4, begin=0, end=max_iters,
                        by_epoch=False)]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=250, max_keep_ckpts=2),
)
custom_hooks = [dict(type="LossCurveHook", interval=20), dict(type="ProgressBarHook")]
