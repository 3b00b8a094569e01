"""Every training-free method's inference defaults against its official repository.

One row per method: the values, and the official file each comes from (read at the commits
named). A ``Segmenter`` given nothing but a backbone without defaults of its own (the tiny test
ViT) must take exactly these; the configs in ``configs/training_free`` inherit them and set only
per-dataset values on top.
"""

import inspect

import pytest

from ovdense import Segmenter
from ovdense.backbone.dense import METHODS, naclip_block, proxy_attention, proxyclip_block
from ovdense.backbone.vfm import create_vfm

FIELDS = ("short_side", "window", "logit_scale", "pamr", "image_engineering", "close_labels", "cluster")

# method: ((short_side, window (crop, stride), logit_scale, pamr, image_engineering, close_labels,
#           cluster), where each value comes from)
OFFICIAL = {
    "vanilla": (
        (336, (224, 112), 40.0, False, False, False, False),
        "the SCLIP protocol the later papers re-evaluate CLIP with: wangf3014/SCLIP@b56bd30 "
        "clip_segmentor.py CLIPForSegmentation(logit_scale=40, slide_crop=224, slide_stride=112, "
        "pamr_steps=0); configs/cfg_ade20k.py Resize(scale=(2048, 336))",
    ),
    "maskclip": (
        (512, (0, 0), 40.0, False, False, False, False),
        "chongzhou96/MaskCLIP configs/_base_/datasets/{ade20k,coco-stuff164k,pascal_voc12}.py "
        "img_scale=(2048, 512); configs/_base_/models/maskclip_vit16.py test_cfg=dict(mode='whole'); "
        "its MaskClipHead has no temperature, so SCLIP's 40 (it only matters for bg_threshold)",
    ),
    "sclip": (
        (336, (224, 112), 40.0, False, False, False, False),
        "wangf3014/SCLIP@b56bd30 clip_segmentor.py CLIPForSegmentation(logit_scale=40, slide_crop=224, "
        "slide_stride=112, pamr_steps=0); configs/cfg_ade20k.py Resize(scale=(2048, 336))",
    ),
    "clearclip": (
        (448, (448, 224), 50.0, False, False, False, False),
        "mc-lan/ClearCLIP@ad68a40 clearclip_segmentor.py ClearCLIPSegmentation(logit_scale=50, "
        "slide_stride=224, slide_crop=448), no PAMR; configs/cfg_ade20k.py Resize(scale=(2048, 448))",
    ),
    "naclip": (
        (336, (224, 112), 40.0, True, False, False, False),
        "sinahmr/NACLIP@0cac3a6 naclip.py NACLIP(pamr_steps=10, pamr_stride=(8, 16), logit_scale=40, "
        "slide_stride=112, slide_crop=224); configs/cfg_ade20k.py Resize(scale=(2048, 336))",
    ),
    "cliptrase": (
        (224, (0, 0), 100.0, False, False, False, True),
        "leaves162/CLIPtrase@2b7de61 clip_self_correlation.py self_clip(image_size=224): Resize(224) "
        "and one pass, patch logits × clip.logit_scale.exp() (100 for OpenAI CLIP), DBSCAN vote",
    ),
    "itaclip": (
        (336, (224, 28), 40.0, True, True, True, False),
        "m-arda-aydn/ITACLIP@521a33c itaclip_segmentor.py ITACLIP_Segmentor(logit_scale=40, "
        "slide_crop=224) and postprocess_result's cv2.MORPH_CLOSE (always); configs/cfg_voc21.py, "
        "cfg_context60.py, cfg_coco_object.py: slide_stride=28, pamr_steps=10, img_engineering=True, "
        "Resize(scale=(2048, 336))",
    ),
    "proxyclip": (
        (336, (336, 112), 40.0, False, False, False, False),
        "mc-lan/ProxyCLIP@e7b767f proxyclip_segmentor.py ProxyCLIPSegmentation(logit_scale=40, "
        "slide_stride=112, slide_crop=336), no PAMR; configs/cfg_voc21.py Resize(scale=(2048, 336))",
    ),
}


def test_the_table_covers_every_method():
    assert set(OFFICIAL) == set(METHODS)


@pytest.mark.parametrize("method", list(OFFICIAL))
def test_segmenter_defaults_are_the_official_ones(tiny_backbone, method):
    assert tiny_backbone.defaults == {}  # else the backbone's own defaults would come first
    values, source = OFFICIAL[method]
    vfm = create_vfm("dino_vitb16", "random") if "vfm" in METHODS[method].needs else None
    seg = Segmenter(tiny_backbone, method, ["a", "b"], templates="single", vfm=vfm)
    got = tuple(getattr(seg, name) for name in FIELDS)
    assert got == values, f"{method}: {dict(zip(FIELDS, got))} but the official {source}"


def test_option_defaults_are_the_official_ones(tiny_backbone):
    """Defaults of options that are not part of the protocol table."""
    seg = Segmenter(tiny_backbone, "itaclip", ["a", "b"], templates="single")
    # ITACLIP_Segmentor(img_eng_coefficient=0.75, def_coefficient=0.2) in itaclip_segmentor.py
    assert (seg.image_engineering_weight, seg.definition_weight) == (0.75, 0.2)
    # NACLIP(gaussian_std=5.) in naclip.py
    assert inspect.signature(naclip_block).parameters["std"].default == 5.0
    # ProxyCLIPSegmentation(beta=1.2, gamma=3.0) and forward_slide's compute_padsize(H, W, 56)
    for function in (proxyclip_block, proxy_attention):
        parameters = inspect.signature(function).parameters
        assert (parameters["beta"].default, parameters["gamma"].default) == (1.2, 3.0)
    vfm = create_vfm("dino_vitb16", "random")
    assert Segmenter(tiny_backbone, "proxyclip", ["a"], templates="single", vfm=vfm).pad_multiple == 56
    assert Segmenter(tiny_backbone, "naclip", ["a"], templates="single").pad_multiple == 8  # the patch
