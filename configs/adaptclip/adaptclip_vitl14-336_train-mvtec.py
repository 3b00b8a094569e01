# AdaptCLIP trained on MVTec AD (its test split, all 15 categories), for evaluation on VisA:
#   python tools/train.py configs/adaptclip/adaptclip_vitl14-336_train-mvtec.py
#   ovdense anomaly-eval --dataset visa --root data/visa --method adaptclip --model ViT-L-14-336 \
#       --head-checkpoint WORK_DIR/adaptclip_head.safetensors [--shots 1|2|4]
_base_ = "../_base_/adaptclip_train.py"
