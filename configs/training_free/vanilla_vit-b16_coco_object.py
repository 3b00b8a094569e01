_base_ = "../_base_/datasets/coco_object.py"

# Settings of wangf3014/SCLIP configs/cfg_coco_object.py (CLIP is evaluated with SCLIP's protocol).
# Everything else is the method's official default (ovdense methods).
model = dict(method="vanilla", logit_scale=50.0, bg_threshold=0.1)
