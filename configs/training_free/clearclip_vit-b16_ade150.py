_base_ = "../_base_/datasets/ade150.py"

# Settings of mc-lan/ClearCLIP configs/cfg_ade20k.py.
model = dict(method="clearclip")
