# CLIPSeg rd64-uni (ViT-B/16) trained on PhraseCut train and scored on PhraseCut test as the paper's
# PhraseCut table (mIoU, IoU_FG at t = 0.3, AP): timojl/clipseg experiments/phrasecut.yaml, its
# rd64-uni row (the base holds the optimiser, schedule, batch 64 and the prompt mix). The data is
# PhraseCut's own folder (ChenyunWu/PhraseCutDataset: python download_dataset.py writes
# data/VGPhraseCut_v0 there; link or copy it to data/VGPhraseCut_v0 here):
#   python tools/train.py configs/clipseg/clipseg_vit-b16_phrasecut.py --amp
#   python tools/test.py configs/clipseg/clipseg_vit-b16_phrasecut.py --checkpoint WORK_DIR/iter_20000.pth
# Offline, a synthetic PhraseCut in the same layout:
#   python tools/data/make_synthetic_phrasecut.py --out synthetic_phrasecut
#   ... --cfg-options train_dataloader.dataset.dataset.data_root=synthetic_phrasecut/VGPhraseCut_v0 \
#       test_dataloader.dataset.data_root=synthetic_phrasecut/VGPhraseCut_v0
# One sample per (image, phrase) task (ovdense/mm/phrasecut.py); a test sample's phrase is its only
# prompt (model.test_classnames stays None).

_base_ = "../_base_/clipseg_train.py"

data_root = "data/VGPhraseCut_v0"
image_size = 352
# what PackSegInputs keeps: the phrase (the test prompt) and label → class id (the training prompt)
meta_keys = ("img_path", "ori_shape", "img_shape", "pad_shape", "scale_factor", "flip", "flip_direction",
             "reduce_zero_label", "task_id", "phrase", "phrase_id", "label_classes")
# The official crop (datasets/phrasecut.py, load_sample with aug_crop: a random square of the short
# side, up to 50 tries for one with >= 5 % of it the phrase, then 352 x 352) as mmseg transforms:
# the short side to 352, a random 352 x 352 crop (up to 10 tries for one no class fills beyond 95 %).
# No flip: the official training has none, and a phrase may say "left".
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadPhraseMask"),
    dict(type="ResizeShortestEdge", scale=image_size, max_size=100 * image_size),  # max_size never binds
    dict(type="RandomCrop", crop_size=(image_size, image_size), cat_max_ratio=0.95),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
# a visual prompt's sample (another task with the same phrase): the whole image fit into the input,
# as the base's support_pipeline, its region drawn from the polygons
support_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadPhraseMask"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
train_dataloader = dict(
    dataset=dict(support_pipeline=support_pipeline,
                 dataset=dict(type="PhraseCutDataset", data_root=data_root, split="train",
                              pipeline=train_pipeline)),
)
# the whole image: OvdenseCLIPSeg resizes it to its input and answers at the image's size
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadPhraseMask"),
    dict(type="PackSegInputs", meta_keys=meta_keys),
]
test_dataloader = dict(
    dataset=dict(type="PhraseCutDataset", data_root=data_root, split="test", test_mode=True,
                 pipeline=test_pipeline),
)
# scored at 352 x 352 as the official score.py (image and mask squashed to the input size);
# resize_to=None scores at each image's size, as PhraseCut's own evaluate.py
test_evaluator = dict(_delete_=True, type="PhraseGroundingMetric", threshold=0.3,
                      resize_to=(image_size, image_size))
