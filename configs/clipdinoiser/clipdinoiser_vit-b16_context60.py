_base_ = "../_base_/datasets/context60.py"

# CLIP-DINOiser (wysoczanska/clip_dinoiser) on OpenCLIP ViT-B/16 (laion2b_s34b_b88k), its eval protocol:
# short side 448, windows 448/224, the learned background (FOUND's rule) on VOC and COCO-Object.
# The head: python tools/model_converters/clipdinoiser2ovdense.py checkpoints/last.pt checkpoints
# Departure: ovdense's class files (synonyms, as every method here) for the official one-word names.
model = dict(
    method="clipdinoiser",
    backbone=dict(name="ViT-B-16", pretrained="laion2b_s34b_b88k"),
    head_checkpoint="checkpoints/clipdinoiser-head.safetensors",
    found_background=False,  # main_eval.py: the rule runs on VOC and COCO-Object only
)
