# COCO-Object val2017: 5000 images, background + COCO's 80 thing classes.
# Layout: data/coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png}
# (tools/data/dataset_converters/coco_object.py writes them from COCO's instances_val2017.json).

_base_ = ["../default_runtime.py", "../ovdense_vit-b16.py"]

model = dict(classnames="{{fileDirname}}/../classnames/coco_object.txt")
test_dataloader = dict(
    dataset=dict(
        type="COCOObjectDataset",
        data_root="data/coco_stuff164k",
        data_prefix=dict(img_path="images/val2017", seg_map_path="annotations/val2017"),
    ),
)
