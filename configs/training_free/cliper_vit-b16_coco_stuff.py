_base_ = "../_base_/datasets/coco_stuff.py"

# Settings of linsun449/cliper.code scripts/config/vit-b-16/ovs_stuff164.yaml (its active lines; the sliding
# window's stride is always 112 px), without the diffusion refinement (--refinement None: the README's
# figures in parentheses). Everything else is CLIPer's default (its ADE20K settings). Class files: the
# official ones (configs/_base_/classnames/cliper/).
model = dict(
    method="cliper",
    classnames="{{fileDirname}}/../_base_/classnames/cliper/coco_stuff.txt",
    dataset_background=False,  # CLIPer's background is not one of the dataset's classes
    logit_scale=50.0,
    score_threshold=0.1,
    bg_threshold=0.1,
)
