_base_ = "../_base_/datasets/coco_object.py"

# Settings of linsun449/cliper.code scripts/config/vit-b-16/ovs_coco5k.yaml (its active lines; the sliding
# window's stride is always 112 px), without the diffusion refinement (--refinement None: the README's
# figures in parentheses). Everything else is CLIPer's default (its ADE20K settings). Class files: the
# official ones (configs/_base_/classnames/cliper/).
model = dict(
    method="cliper",
    classnames="{{fileDirname}}/../_base_/classnames/cliper/coco_object.txt",
    templates="imagenet80",
    window=(224, 112),
    logit_scale=50.0,
)
