_base_ = "../_base_/datasets/voc20.py"

# Settings of mc-lan/ClearCLIP configs/cfg_voc20.py.
model = dict(method="clearclip")
