# SAN ViT-L/14-336 evaluated on voc20 (whole image, short side 640, long side <= 2560: the official
# MIN_SIZE_TEST/MAX_SIZE_TEST), with a trained or converted head:
#   python tools/test.py configs/san/san_vit-l14_eval_voc20.py \
#      --cfg-options model.head_checkpoint=HEAD.safetensors
#   python tools/test.py configs/san/san_vit-l14_eval_voc20.py --checkpoint work_dirs/<run>/iter_60000.pth
# (HEAD.safetensors: tools/train.py's san_head.safetensors or tools/model_converters/san2ovdense.py).

_base_ = "../_base_/datasets/voc20.py"

model = dict(
    _delete_=True,
    type="OvdenseSAN",
    backbone=dict(name="ViT-L-14-336", pretrained="openai"),
    classnames={{_base_.model.classnames}},
    head_checkpoint=None,
    data_preprocessor=dict(type="SanDataPreprocessor"),
    short_side=640,
)
