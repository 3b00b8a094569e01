# CLIPSelf on OpenAI ViT-B/16, COCO train2017 images as "image patches" (a random M x N grid per image, at
# most 20 cells): long side 1024 for the student, 224 crops for the teacher, alpha 0.7.
#   torchrun --nproc_per_node 8 tools/train.py configs/clipself/clipself_vitb16_coco_grid.py --launcher pytorch --amp
# Region proposals instead (the paper's 37.6 novel AP50 row), a COCO-format file of proposals:
#   --cfg-options train_dataloader.dataset.mode=proposals train_dataloader.dataset.ann_file=PROPOSALS.json

_base_ = "../_base_/clipself_train.py"
