_base_ = "../_base_/datasets/context59.py"

# Settings of wangf3014/SCLIP configs/cfg_context59.py.
model = dict(method="sclip")
