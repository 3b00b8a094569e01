# COCO-Stuff-171 val2017 (164k version): 5000 images, 171 classes; 255 ignored.
# Layout (mmseg's): data/coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png}
# (mmseg's coco_stuff164k.py or tools/data/dataset_converters/coco_stuff.py).

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/coco_stuff.txt")
test_dataloader = dict(
    dataset=dict(
        type="COCOStuffDataset",
        data_root="data/coco_stuff164k",
        data_prefix=dict(img_path="images/val2017", seg_map_path="annotations/val2017"),
    ),
)
