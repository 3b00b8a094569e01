_base_ = "../_base_/datasets/cityscapes.py"

# Settings of sinahmr/NACLIP configs/cfg_city_scapes.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="naclip", short_side=560)
