# AdaptCLIP trained on VisA (its test split, all 12 categories), for evaluation on MVTec AD:
#   python tools/train.py configs/adaptclip/adaptclip_vitl14-336_train-visa.py
#   ovdense anomaly-eval --dataset mvtec --root data/mvtec --method adaptclip --model ViT-L-14-336 \
#       --head-checkpoint WORK_DIR/adaptclip_head.safetensors [--shots 1|2|4]
_base_ = "../_base_/adaptclip_train.py"

train_dataloader = dict(dataset=dict(root="data/visa", layout="visa"))
# 15 epochs of VisA's 2,162 test images (split_csv/1cls.csv) at batch 8: 15 x 271 iterations
max_iters = 4065
train_cfg = dict(max_iters=max_iters, val_interval=max_iters + 1)
default_hooks = dict(checkpoint=dict(interval=271))
