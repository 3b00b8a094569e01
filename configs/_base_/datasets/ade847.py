# ADE20K-Full val with 847 classes: 2000 images; 65535 ignored.
# Layout (detectron2's datasets/prepare_ade20k_full.py, as SAN, CAT-Seg and CLIPtrase use it):
# data/ADE20K_2021_17_01/{images_detectron2/validation/*.jpg, annotations_detectron2/validation/*.tif (16 bit)};
# class names: configs/_base_/classnames/ade847.txt (the 847 names in label order, with WordNet synonyms).

_base_ = ["../default_runtime.py", "../ovdense_vit-b16_16bit.py"]

model = dict(classnames="{{fileDirname}}/../classnames/ade847.txt")
test_dataloader = dict(
    dataset=dict(
        type="ADE20K847Dataset",
        classnames="{{fileDirname}}/../classnames/ade847.txt",
        data_root="data/ADE20K_2021_17_01",
        data_prefix=dict(img_path="images_detectron2/validation", seg_map_path="annotations_detectron2/validation"),
    ),
)
