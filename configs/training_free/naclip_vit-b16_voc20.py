_base_ = "../_base_/datasets/voc20.py"

# Settings of sinahmr/NACLIP configs/cfg_voc20.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="naclip", window=(0, 0))
