_base_ = "../_base_/datasets/coco_stuff.py"

# Settings of wangf3014/SCLIP configs/cfg_coco_stuff164k.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="sclip", short_side=448)
