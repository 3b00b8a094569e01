# F-ViT Mask R-CNN with a NAS-FPN on frozen OpenAI CLIP ViT-B/16, OV-LVIS, shaped like the official
# detector: wusize/CLIM ovdet/configs/clip_based/openai_vitb16/mask_rcnn_nasfpn_openai_vitb16_clim_bs64_ov_lvis_4x.py
# (its bases mmdet::_base_/models/mask-rcnn_r50_fpn.py and ovdet/configs/_base_/datasets/
# lvis_v1_ovd_base_lsj_640.py). Its published checkpoint (CLIM README: mask APr 24.3) runs here once
# converted (tools/model_converters/fvit2ovdense.py; docs/detection.md):
#   python tools/test.py configs/ovdet/fvit_vitb16_ovlvis_clim.py --cfg-options \
#       model.clip.pretrained=weights/clim-ovlvis/backbone.safetensors \
#       model.head_checkpoint=weights/clim-ovlvis/fvit-head.safetensors
# What fvit_vitb16_ovlvis.py changes to get there:
#   - the neck: mmdet's NASFPN (7 stages, 256 channels, 5 levels) instead of the FPN;
#   - SyncBN in the simple pyramid, the NAS-FPN, the box head's convs and the mask head (one process:
#     plain BatchNorm, the same layer in eval, the same keys);
#   - box-head FCs 1024 wide; the ensemble α = 0.35, β = 0.65, T_vlm = 50;
#   - RPN test nms_pre 2000 (as the base); rcnn test: score 1e-4, NMS 0.5, 300 per image, masks at 0.5;
#   - the test input: long side 640, padded to 640 × 640 (CLIM's lsj_640 test pipeline; the pad value
#     is ovdense's 0, as in fvit_vitb16_ovcoco_clim.py);
#   - evaluation as CLIM's: mask AP on lvis_v1_val.json, all 1203 classes; lvis/segm_APr is the novel AP;
#   - the CLIP weights as CLIM's config names them, a file (exact GELU; pass the converted
#     backbone.safetensors instead to run a converted checkpoint).
# The vocabulary is fvit_vitb16_ovlvis.py's: 866 base (frequent + common) classes for training, the
# 1203 for testing, from the class files of tools/data/dataset_converters/lvis_v1_ovd.py. A converted
# head stores CLIM's 1203 text rows under those names, and they are used for those classes.
# ovdense's NAS-FPN in plain torch (PlainFViT, Detector) equals mmdet's (tests/test_nasfpn.py), and the
# whole detector equals CLIM's given the same weights (tests/test_fvit_official.py).
#
#   torchrun --nproc_per_node 8 tools/train.py configs/ovdet/fvit_vitb16_ovlvis_clim.py \
#       --launcher pytorch --amp

_base_ = "fvit_vitb16_ovlvis.py"

sync_bn = dict(type="SyncBN", requires_grad=True)

model = dict(
    clip=dict(name="ViT-B-16", pretrained="checkpoints/openai_vitb16_cc3m_clim.pt"),  # CLIM README's file
    pyramid=dict(_delete_=True, norm="sync_batch"),
    neck=dict(_delete_=True, type="NASFPN", in_channels=[768] * 4, out_channels=256, num_outs=5,
              stack_times=7, norm_cfg=sync_bn),
    roi_head=dict(
        bbox_head=dict(fc_out_channels=1024, norm_cfg=dict(_delete_=True, **sync_bn),
                       alpha=0.35, beta=0.65, vlm_temperature=50.0, temperature=50.0),
        mask_head=dict(norm_cfg=dict(_delete_=True, **sync_bn))),
    test_cfg=dict(rpn=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                           min_bbox_size=0),
                  rcnn=dict(score_thr=0.0001, nms=dict(type="nms", iou_threshold=0.5), max_per_img=300,
                            mask_thr_binary=0.5)),
)

test_size = (640, 640)
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="Resize", scale=test_size, keep_ratio=True),
    dict(type="Pad", size=test_size),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
