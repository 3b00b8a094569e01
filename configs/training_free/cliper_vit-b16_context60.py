_base_ = "../_base_/datasets/context60.py"

# Settings of linsun449/cliper.code scripts/config/vit-b-16/ovs_context.yaml (its active lines; the sliding
# window's stride is always 112 px), without the diffusion refinement (--refinement None: the README's
# figures in parentheses). Everything else is CLIPer's default (its ADE20K settings). Class files: the
# official ones (configs/_base_/classnames/cliper/).
model = dict(
    method="cliper",
    classnames="{{fileDirname}}/../_base_/classnames/cliper/context60.txt",
    window=(224, 112),
    score_threshold=0.45,
    bg_threshold=0.45,
)
