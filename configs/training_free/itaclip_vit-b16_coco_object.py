_base_ = "../_base_/datasets/coco_object.py"

# Settings of m-arda-aydn/ITACLIP configs/cfg_coco_object.py; its LLaMA-generated definitions and
# synonyms are not shipped (pass model.definitions to add them).
# Everything else is the method's official default (ovdense methods).
model = dict(method="itaclip", logit_scale=50.0, bg_threshold=0.1)
