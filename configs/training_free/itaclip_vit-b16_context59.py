_base_ = "../_base_/datasets/context59.py"

# ITACLIP's repository has no config for this dataset: the method's defaults.
model = dict(method="itaclip")
