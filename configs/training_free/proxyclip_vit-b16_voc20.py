_base_ = "../_base_/datasets/voc20.py"

# Settings of mc-lan/ProxyCLIP configs/cfg_voc20.py (its tables: OpenAI ViT-B/16 with DINO ViT-B/8).
# Its class files (configs/_base_/classnames/proxyclip/); everything else is the method's official
# default (ovdense methods). The DINO weights are the official file
# (https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth): put it in
# checkpoints/ or set --cfg-options model.vfm.weights=PATH.
model = dict(
    method="proxyclip",
    classnames="{{fileDirname}}/../_base_/classnames/proxyclip/voc20.txt",
    vfm=dict(name="dino_vitb8", weights="checkpoints/dino_vitbase8_pretrain.pth"),
)
