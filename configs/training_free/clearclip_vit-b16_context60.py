_base_ = "../_base_/datasets/context60.py"

# Settings of mc-lan/ClearCLIP configs/cfg_context60.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="clearclip", bg_threshold=0.15)
