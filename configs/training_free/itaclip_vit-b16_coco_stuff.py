_base_ = "../_base_/datasets/coco_stuff.py"

# Settings of m-arda-aydn/ITACLIP configs/cfg_coco_stuff164k.py; its LLaMA-generated definitions and
# synonyms are not shipped (pass model.definitions to add them).
# Everything else is the method's official default (ovdense methods).
model = dict(method="itaclip", short_side=448)
