_base_ = "../_base_/datasets/voc20.py"

# CLIPtrase's evaluation (detectron2) sets no per-dataset thresholds: the method's
# defaults (short side 224, one pass, cluster vote).
model = dict(method="cliptrase")
