_base_ = "../_base_/datasets/coco_object.py"

# Settings of sinahmr/NACLIP configs/cfg_coco_object.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="naclip", bg_threshold=0.1)
