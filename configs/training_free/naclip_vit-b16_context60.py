_base_ = "../_base_/datasets/context60.py"

# Settings of sinahmr/NACLIP configs/cfg_context60.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="naclip", bg_threshold=0.1)
