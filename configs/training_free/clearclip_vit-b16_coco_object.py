_base_ = "../_base_/datasets/coco_object.py"

# Settings of mc-lan/ClearCLIP configs/cfg_coco_object.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="clearclip", bg_threshold=0.4)
