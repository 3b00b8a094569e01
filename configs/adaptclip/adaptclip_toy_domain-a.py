# AdaptCLIP on the toy CLIP (6 blocks, patch 8), offline on a CPU: trained on the toy world's anomaly domain A
# (13 (shape, texture) categories; tools/analysis/eval_adaptclip_toy.py writes the data, trains with this
# config and evaluates on domain B, whose categories it never saw). 128 px (a 16 x 16 grid), taps 2/3/5/6,
# σ = 1 px (4 px at 518). 600 iterations here; the experiment runs 15 epochs of its data at batch 8.
#   python tools/analysis/eval_adaptclip_toy.py --data-only --out toy_anomaly
#   python tools/train.py configs/adaptclip/adaptclip_toy_domain-a.py   # WORK_DIR/adaptclip_head.safetensors
_base_ = "../_base_/adaptclip_train.py"

model = dict(clip=dict(_delete_=True, name="toy"), head=dict(image_size=128, sigma=1.0))
train_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(root="toy_anomaly/train-A", image_size=128),
)
max_iters = 600
train_cfg = dict(max_iters=max_iters, val_interval=max_iters + 1)
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=100, max_keep_ckpts=2))
