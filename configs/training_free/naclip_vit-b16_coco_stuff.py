_base_ = "../_base_/datasets/coco_stuff.py"

# Settings of sinahmr/NACLIP configs/cfg_coco_stuff164k.py.
model = dict(method="naclip")
