_base_ = "../_base_/datasets/cityscapes.py"

# Settings of m-arda-aydn/ITACLIP configs/cfg_cityscapes.py; its LLaMA-generated definitions and
# synonyms are not shipped (pass model.definitions to add them).
# Everything else is the method's official default (ovdense methods).
model = dict(method="itaclip", short_side=560, image_engineering_weight=0.7)
