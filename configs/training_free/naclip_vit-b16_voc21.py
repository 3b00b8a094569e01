_base_ = "../_base_/datasets/voc21.py"

# Settings of sinahmr/NACLIP configs/cfg_voc21.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="naclip", bg_threshold=0.1, window=(0, 0))
