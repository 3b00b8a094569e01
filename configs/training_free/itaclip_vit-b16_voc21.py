_base_ = "../_base_/datasets/voc21.py"

# Settings of m-arda-aydn/ITACLIP configs/cfg_voc21.py; its LLaMA-generated definitions and
# synonyms are not shipped (pass model.definitions to add them).
# Everything else is the method's official default (ovdense methods).
model = dict(
    method="itaclip",
    logit_scale=60.0,
    bg_threshold=0.1,
    area_threshold=0.1,
    image_engineering_weight=0.7,
)
