_base_ = "../_base_/datasets/voc21.py"

# Settings of linsun449/cliper.code scripts/config/vit-b-16/ovs_voc21.yaml (its active lines; the sliding
# window's stride is always 112 px), without the diffusion refinement (--refinement None: the README's
# figures in parentheses). Everything else is CLIPer's default (its ADE20K settings). Class files: the
# official ones (configs/_base_/classnames/cliper/).
model = dict(
    method="cliper",
    classnames="{{fileDirname}}/../_base_/classnames/cliper/voc21.txt",
    window=(336, 112),
    attention_threshold=0.1,
    score_threshold=0.7,
    bg_threshold=0.6,
    normalize_maps=True,
)
