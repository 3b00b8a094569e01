# SAN on the toy backbone (ovdense/assets/toy-clip.*) in the open-vocabulary toy world, offline on a
# CPU: trained on the 20 *base* colour-shape pairs + background (novel objects are ignored pixels),
# evaluated on all 30 pairs + background of held-out scenes.
#   python tools/data/make_synthetic_benchmarks.py --san-toy --out synthetic_san --num-train 2000 --num 100
#   python tools/train.py configs/san/san_toy_synthetic.py          # writes WORK_DIR/san_head.safetensors
#   python tools/analysis/eval_san_toy.py --head work_dirs/san_toy_synthetic/san_head.safetensors --data synthetic_san
# The SAN structure of ViT-B/16, sized for 128 px scenes and the 6-block toy CLIP (width 192, patch
# 8): the side network sees 128 x 128 in patches of 8 (a 16 x 16 grid: at the official patch 16 the
# 8 x 8 masks were too coarse for the toy's small objects), width 192, 6 blocks (the head is 7.3 MB
# in fp16); CLIP sees the scene at full scale (clip_scale 1.0: at the official 0.5 the toy's objects
# shrank to one or two of its 8-pixel patches), trunk 3 blocks + 3 recognition blocks, fusion after
# ln_pre and blocks 1, 2, 3. Fewer mask points (1024 of the 16384 pixels), a shorter schedule at 3x
# the official learning rate (at 10x, 1e-3, the recognition path's attention biases ran to +-100 and
# the head named 12% of object pixels; docs/toy_world.md).
# The shipped head (ovdense/assets/san-toy-head.safetensors) is WORK_DIR/san_head.safetensors in fp16:
#   python -c "import torch, ovdense; from ovdense.heads.san import load_head, save_head; \
#     b = ovdense.create_backbone('toy'); save_head('ovdense/assets/san-toy-head.safetensors', \
#     load_head('WORK_DIR/san_head.safetensors', b), b, dtype=torch.float16)"

_base_ = "../_base_/san_train.py"

data_root = "synthetic_san/data"
crop = 128
max_iters = 1200  # 1.3-1.5 s per iteration of 8 on 2 CPU cores with light work beside: ~31 min
model = dict(
    backbone=dict(_delete_=True, name="toy"),
    classnames="{{fileDirname}}/../_base_/classnames/toy_base.txt",  # background + 20 base pairs
    test_classnames="{{fileDirname}}/../_base_/classnames/toy_all.txt",  # background + all 30 pairs
    head=dict(side_image_size=crop, side_patch=8, side_width=192, side_depth=6, side_mlp=768,
              trunk_depth=3, clip_scale=1.0),
    criterion=dict(num_points=1024),
    data_preprocessor=dict(size_divisor=crop),
    short_side=crop,
)
# multi-scale 0.5-1.5, crop, flip, photometric distortion with its hue shift cut to +-2 degrees
# (hue_delta 1 of OpenCV's 180; 0 is refused by numpy): the toy's classes are named by colour, and
# the default shift of up to 36 degrees turns red into orange
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomChoiceResize", scales=[int(crop * x * 0.1) for x in range(5, 16)],
         resize_type="ResizeShortestEdge", max_size=4 * crop),
    dict(type="RandomCrop", crop_size=(crop, crop), cat_max_ratio=1.0),
    dict(type="PhotoMetricDistortion", hue_delta=1),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(dataset=dict(
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
optim_wrapper = dict(optimizer=dict(lr=3e-4))  # 3x the official rate: a 70x shorter schedule
param_scheduler = [dict(type="PolyLR", power=0.9, eta_min=0.0, begin=0, end=max_iters, by_epoch=False)]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=100, max_keep_ckpts=2),
)
custom_hooks = [dict(type="LossCurveHook", interval=20), dict(type="ProgressBarHook")]
