_base_ = "../_base_/datasets/cityscapes.py"

# Settings of mc-lan/ClearCLIP configs/cfg_city_scapes.py.
# Everything else is the method's official default (ovdense methods).
model = dict(method="clearclip", window=(224, 224))
