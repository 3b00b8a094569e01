_base_ = "../_base_/datasets/cityscapes.py"

# Settings of wangf3014/SCLIP configs/cfg_city_scapes.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="sclip", short_side=560)
