_base_ = "../_base_/datasets/ade150.py"

# Settings of sinahmr/NACLIP configs/cfg_ade20k.py.
model = dict(method="naclip")
