_base_ = "../_base_/datasets/coco_stuff.py"

# Settings of wangf3014/SCLIP configs/cfg_coco_stuff164k.py (CLIP is evaluated with SCLIP's protocol).
# Everything else is the method's official default (ovdense methods).
model = dict(method="vanilla", short_side=448)
