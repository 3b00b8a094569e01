_base_ = "../_base_/datasets/ade150.py"

# Settings of wangf3014/SCLIP configs/cfg_ade20k.py.
model = dict(method="sclip")
