_base_ = "../_base_/datasets/context59.py"

# Settings of sinahmr/NACLIP configs/cfg_context59.py.
model = dict(method="naclip")
