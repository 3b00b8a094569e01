_base_ = "../_base_/datasets/voc20.py"

# Settings of wangf3014/SCLIP configs/cfg_voc20.py.
model = dict(method="sclip")
