_base_ = "../_base_/datasets/coco_stuff.py"

# Settings of mc-lan/ClearCLIP configs/cfg_coco_stuff164k.py.
model = dict(method="clearclip")
