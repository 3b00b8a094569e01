# F-ViT on the toy with the harder open-vocabulary split: every star novel (6 pairs), the 24 other
# pairs base. The detector is never told of stars (they stay in the training pictures, unlabelled, so
# it learns them as background); only the CLIP it sits on knows the word — F-VLM's premise, which the
# default split (every colour and shape among the base pairs) does not meet.
#
#   python tools/data/make_synthetic_detection.py --out synthetic/detection_star --num-train 2000 --num 100 \
#       --novel-shape star
#   python tools/train.py configs/ovdet/fvlm_toy_synthetic_novel_star.py [--cfg-options model.clip.name=toy-clipself]
#   python tools/analysis/eval_detect_toy.py --data synthetic/detection_star --novel-shape star \
#       --head work_dirs/fvlm_toy_synthetic_novel_star/fvit_head.safetensors

_base_ = "./fvlm_toy_synthetic.py"

base_classes = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
                for s in ("circle", "square", "triangle", "ring")]  # open_vocabulary_split("star")[0]
novel_classes = [f"{c} star" for c in ("red", "green", "blue", "yellow", "purple", "orange")]
num_base = len(base_classes)
data_root = "synthetic/detection_star/coco/"

model = dict(
    classes=base_classes,
    roi_head=dict(
        bbox_head=dict(num_classes=num_base,
                       loss_cls=dict(class_weight=[1.0] * num_base + [0.6])),  # F-ViT's background weight
        mask_head=dict(num_classes=num_base)),
)
train_dataloader = dict(dataset=dict(dataset=dict(data_root=data_root, metainfo=dict(classes=tuple(base_classes)))))
val_dataloader = dict(dataset=dict(
    data_root=data_root,
    metainfo=dict(base_classes=tuple(base_classes), novel_classes=tuple(novel_classes))))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations/instances_val2017.json")
test_evaluator = val_evaluator
