_base_ = "../_base_/datasets/context60.py"

# MaskCLIP's repository (mmseg 0.x) has no per-dataset inference settings here: the
# method's defaults (short side 512, one whole-image pass).
model = dict(method="maskclip")
