# ADE20K val (ADEChallengeData2016): 2000 images, 150 classes; label 0 (other) ignored.
# Layout (mmseg's): data/ade/ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}.

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/ade150.txt")
test_dataloader = dict(
    dataset=dict(
        type="ADE20KDataset",
        data_root="data/ade/ADEChallengeData2016",
        data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
    ),
)
