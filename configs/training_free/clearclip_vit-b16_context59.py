_base_ = "../_base_/datasets/context59.py"

# Settings of mc-lan/ClearCLIP configs/cfg_context59.py.
model = dict(method="clearclip")
