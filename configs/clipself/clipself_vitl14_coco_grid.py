# CLIPSelf on OpenAI ViT-L/14 at 336 px, COCO train2017 images as "image patches": long side 896 for the
# student (the paper's L/14 input), 336 crops for the teacher, alpha 0.95.
#   torchrun --nproc_per_node 8 tools/train.py configs/clipself/clipself_vitl14_coco_grid.py --launcher pytorch --amp

_base_ = "../_base_/clipself_train.py"

model = dict(clip=dict(name="ViT-L-14-336", pretrained="openai"))
train_dataloader = dict(dataset=dict(image_size=896, crop_size=336))
