_base_ = "../_base_/datasets/voc21.py"

# Settings of mc-lan/ClearCLIP configs/cfg_voc21.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="clearclip", bg_threshold=0.5)
