# F-ViT Faster R-CNN on frozen OpenAI CLIP ViT-B/16, OV-COCO, shaped like the official detector:
# wusize/CLIM ovdet/configs/clip_based/openai_vitb16/faster_rcnn_fpn_openai_vitb16_clim_bs64_ov_coco_3e.py
# (its bases mmdet::_base_/models/faster-rcnn_r50_fpn.py and ovdet/configs/_base_/datasets/
# coco_ovd_base_lsj.py). What fvit_vitb16_ovcoco.py changes to get there:
#   - SyncBN in the simple pyramid, the FPN and the box head's convs, as CLIM (fvit_vitb16_ovcoco.py has
#     GroupNorm); one process (tools/train.py without a launcher, tools/test.py) runs plain BatchNorm:
#     mmengine's Runner reverts SyncBN there, and in eval the two are the same layer with the same keys;
#   - box-head FCs 1024 wide (CLIM keeps mmdet's base width; fvit_vitb16_ovcoco.py has CLIPSelf's 512);
#   - RPN test nms_pre 1000 (mmdet's base test_cfg; fvit_vitb16_ovcoco.py has 2000);
#   - the test vocabulary is the 80 COCO classes in COCO order (CLIM's cls_embeddings rows): the 48 base
#     classes get α = 0.1 (and are the training vocabulary), the other 32 (17 novel + 15 in neither
#     split) get β = 0.8, T_vlm = 75, background class weight 0.6;
#   - evaluation as CLIM's: all 5000 images of annotations/instances_val2017.json, base and novel AP50
#     over the base and novel classes (CLIM: two CocoMetrics on its wusize/instances_val2017_{base,novel}
#     .json, which keep every image and drop the other split's boxes; OVCocoMetric's base_ap50 and
#     novel_ap50 on the full file are the same numbers, tests/test_ovcoco_metric_official.py);
#   - the CLIP weights as CLIM's config names them, a file (CLIM's README; elsewhere: --cfg-options
#     model.clip.pretrained=PATH): open_clip then builds exact GELU, as CLIM's detector runs (the "openai"
#     tag would give QuickGELU, another network).
# With these, ovdense's detector (mm path and plain PlainFViT) equals CLIM's FVLM given the same weights
# and input tensor (tests/test_fvit_official.py; docs/detection.md#fidelity-to-the-official-code).
#
# Departures kept:
#   - the test pipeline pads to 640 × 640 with 0 before normalisation, on the uint8 image (CLIM loads
#     float32 and pads with the CLIP mean written in the BGR image's slots, which after BGR → RGB and
#     normalisation is (-0.27, 0.00, +0.27), not 0); the plain Detector pads only to a multiple of 32;
#   - the text embeddings come from the backbone's own text tower with the imagenet80 templates (CLIM
#     stores precomputed embeddings of 63 hand-written templates with an {article} slot, probably made
#     with OpenAI's QuickGELU text tower);
#   - training as fvit_vitb16_ovcoco.py: novel classes absent from the training vocabulary instead of
#     masked, SeededRandomSampler, the background initialised from the text "background", 5052
#     iterations instead of 3 epochs.
#
#   torchrun --nproc_per_node 8 tools/train.py configs/ovdet/fvit_vitb16_ovcoco_clim.py \
#       --launcher pytorch --amp
#   python tools/test.py configs/ovdet/fvit_vitb16_ovcoco_clim.py \
#       --checkpoint work_dirs/fvit_vitb16_ovcoco_clim/iter_5052.pth

_base_ = "fvit_vitb16_ovcoco.py"

# base_classes and novel_classes (the 48 / 17 of OVR-CNN's split, COCO order: CLIM's class_weight == 1
# positions are the 48), the training vocabulary, num_classes and the class weights come from the base
coco_classes = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # mmdet CocoDataset.METAINFO["classes"]: COCO's category order
norm_cfg = dict(_delete_=True, type="SyncBN", requires_grad=True)  # replaces the base GroupNorm entirely

model = dict(
    clip=dict(name="ViT-B-16", pretrained="checkpoints/openai_vitb16_coco_clim.pt"),  # CLIM README's file
    test_classes=list(coco_classes),
    pyramid=dict(_delete_=True, norm="sync_batch"),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(
        fc_out_channels=1024, norm_cfg=norm_cfg,
        alpha=0.1, beta=0.8, vlm_temperature=75.0, temperature=50.0)),
    test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                           min_bbox_size=0),
                  rcnn=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.4), max_per_img=100)),
)

data_root = "data/coco/"
val_dataloader = dict(dataset=dict(
    ann_file="annotations/instances_val2017.json",
    metainfo=dict(classes=coco_classes)))  # base_classes and novel_classes: the base config's
test_dataloader = val_dataloader
val_evaluator = dict(type="OVCocoMetric", ann_file=data_root + "annotations/instances_val2017.json")
test_evaluator = val_evaluator
