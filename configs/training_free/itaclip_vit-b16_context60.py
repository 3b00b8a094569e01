_base_ = "../_base_/datasets/context60.py"

# Settings of m-arda-aydn/ITACLIP configs/cfg_context60.py; its LLaMA-generated definitions and
# synonyms are not shipped (pass model.definitions to add them).
# Everything else is the method's official default (ovdense methods).
model = dict(method="itaclip", logit_scale=55.0, bg_threshold=0.1)
