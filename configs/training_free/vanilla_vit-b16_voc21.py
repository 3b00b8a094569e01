_base_ = "../_base_/datasets/voc21.py"

# Settings of wangf3014/SCLIP configs/cfg_voc21.py (CLIP is evaluated with SCLIP's protocol).
# Everything else is the method's official default (ovdense methods).
model = dict(method="vanilla", logit_scale=65.0, bg_threshold=0.1, area_threshold=0.1)
