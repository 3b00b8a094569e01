_base_ = "../_base_/datasets/voc20.py"

# Settings of wangf3014/SCLIP configs/cfg_voc20.py (CLIP is evaluated with SCLIP's protocol).
model = dict(method="vanilla")
