_base_ = "../_base_/datasets/cityscapes.py"

# Settings of mc-lan/ProxyCLIP configs/cfg_city_scapes.py (its tables: OpenAI ViT-B/16 with DINO ViT-B/8).
# Its class files (configs/_base_/classnames/proxyclip/); everything else is the method's official
# default (ovdense methods). The DINO weights are the official file
# (https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth): put it in
# checkpoints/ or set --cfg-options model.vfm.weights=PATH.
model = dict(
    method="proxyclip",
    classnames="{{fileDirname}}/../_base_/classnames/proxyclip/cityscapes.txt",
    vfm=dict(name="dino_vitb8", weights="checkpoints/dino_vitbase8_pretrain.pth"),
    short_side=448,
    window=(224, 112),
)
