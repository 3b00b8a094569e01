_base_ = "../_base_/datasets/cityscapes.py"

# Settings of linsun449/cliper.code scripts/config/vit-b-16/ovs_city.yaml (its active lines; the sliding
# window's stride is always 112 px), without the diffusion refinement (--refinement None: the README's
# figures in parentheses). Everything else is CLIPer's default (its ADE20K settings). Class files: the
# official ones (configs/_base_/classnames/cliper/).
# Departure: the official dataset code cuts each 2048x1024 image into two square halves
# (data/cityscapes/city_datasets.py); ovdense segments the whole image.
model = dict(
    method="cliper",
    classnames="{{fileDirname}}/../_base_/classnames/cliper/cityscapes.txt",
    dataset_background=False,  # CLIPer's background is not one of the dataset's classes
    templates="imagenet80",
    short_side=560,
    attention_threshold=0.35,
    score_threshold=0.0,
    bg_threshold=0.0001,
)
