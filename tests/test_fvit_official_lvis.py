"""ovdense's F-ViT against CLIM's OV-LVIS detector (wusize/CLIM ``ovdet``: Mask R-CNN with a NAS-FPN on
OpenAI ViT-B/16), run as it is from its mirror, on the same random weights and input tensor.

CLIM's model is built by mmdet's registry from CLIM's own config (``CLIM_LVIS_CONFIG``), with its own
1203 text rows (``lvis_openai_vitb16_hand_craft.npy``) and class weights (``lvis_v1_train_cat_norare_info
.json``); ovdense's mm model from ``configs/ovdet/fvit_vitb16_ovlvis_clim.py`` and its plain-torch model
(``PlainFViT``) from that model's head config. The shim is tests/test_fvit_official.py's (its docstring
says what it changes: CLIM's open_clip fork imported under its name only while ``ovdet`` imports; random
weights with spread BN statistics; ovdense's backbone ``ViT-B-16`` random with CLIM's visual weights
copied in, the ``single`` template, CLIM's text rows handed in for the 1203 names). The vocabulary is
named as ``tools/data/dataset_converters/lvis_v1_ovd.py`` names it, from CLIM's own category file, so
ovdense's seen/unseen (by name: the 866 frequent and common classes) is checked against CLIM's
(by position: class weight > 0).

Compared, on the batch of test_fvit_official.py (two images of different sizes in one 224 × 288
tensor): the NAS-FPN's five levels, the RPN proposals, and each whole path's detections — boxes, scores,
labels and instance masks — with the CLIP term and without it. The measured differences are printed
(``pytest -s``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from official_clim import clim_checkout, import_clim
from test_fvit_official import (
    METAS,
    Taps,
    _assert_same_detections,
    _plain_value,
    max_diff,
    on_clims_weights,
    padded_input,
    report,
    samples,
    spread_weights,
)
from tool_runs import load_tool

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ovdet" / "fvit_vitb16_ovlvis_clim.py"
CLIM_LVIS_CONFIG = ("ovdet/configs/clip_based/openai_vitb16/"
                    "mask_rcnn_nasfpn_openai_vitb16_clim_bs64_ov_lvis_4x.py")
METADATA = "ovdet/data/metadata/"
CLIM_PATHS = ("src/open_clip", "ovdet/ovdet", "ovdet/configs", METADATA + "lvis_openai_vitb16_hand_craft.npy",
              METADATA + "lvis_v1_train_cat_norare_info.json", METADATA + "lvis_v1_train_cat_info.json")
DETECTIONS = 300  # CLIM's max_per_img


def lvis_names(tree: Path) -> tuple[list[str], list[str]]:
    """(all 1203 names, the 866 base names) in category-id order, as ovdense's LVIS converter writes the
    class files, from CLIM's own category list."""
    converter = load_tool("data/dataset_converters/lvis_v1_ovd")
    categories = json.loads((tree / METADATA / "lvis_v1_train_cat_info.json").read_text())
    _, base, names = converter.base_split(dict(categories=categories, images=[], annotations=[]))
    return names, base


def calibrate_neck(clim, x: torch.Tensor) -> None:
    """The running statistics of every BN in the pyramid and the NAS-FPN set to those of its input on
    ``x`` (one pass in training mode at momentum 1), as a trained network's are; the affine parameters
    stay ``spread_weights``'s. With random statistics the seven stages of sums grow the levels to ~1e5
    (every RPN score saturates, and float32 rounding grows with them)."""
    norms = [m for part in (clim.backbone, clim.neck) for m in part.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = 1.0
        norm.train()
    with torch.no_grad():
        clim.extract_feat(x)
    for norm in norms:
        norm.momentum = 0.1
        norm.eval()


class LvisModels:
    """CLIM's OV-LVIS detector and ovdense's two on its weights, the vocabulary and the input."""

    def __init__(self, tree: Path, cache: Path, patch: pytest.MonkeyPatch):
        from mmdet.registry import MODELS
        from mmengine.config import Config
        from mmengine.registry import init_default_scope


        import_clim(tree)
        init_default_scope("mmdet")
        cfg = Config.fromfile(str(tree / CLIM_LVIS_CONFIG))
        cfg.model.backbone.pretrained = None
        with patch.context() as cwd:
            cwd.chdir(tree / "ovdet")  # the text rows' and class weights' paths are relative to ovdet/
            torch.manual_seed(0)
            self.clim = MODELS.build(cfg.model).eval()
        self.clim_cfg = cfg
        spread_weights(self.clim)

        self.x = padded_input()
        calibrate_neck(self.clim, self.x)

        self.names, self.base = lvis_names(tree)
        self.text = self.clim.roi_head.bbox_head.cls_embeddings.clone()  # 1203, D
        ours = Config.fromfile(str(CONFIG), import_custom_modules=False)
        ours.model.clip = dict(name="ViT-B-16", pretrained=None, cache_dir=str(cache))
        ours.model.templates = "single"
        ours.model.classes, ours.model.test_classes = list(self.base), list(self.names)
        self.ovd = MODELS.build(ours.model).eval()
        self.plain, self.seen = on_clims_weights(self.clim, self.ovd, self.names, self.text, patch)

    samples = staticmethod(samples)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tree = clim_checkout(tmp_path_factory.mktemp("clim-lvis"), CLIM_PATHS)
    with pytest.MonkeyPatch.context() as patch:
        yield LvisModels(tree, tmp_path_factory.mktemp("cache"), patch)


def _replace_output(module, value):
    """A forward hook that makes ``module`` return ``value`` (``remove()`` it after)."""
    return module.register_forward_hook(lambda module, args, output: value)


@pytest.fixture(scope="module")
def passes(models):
    """Each path's whole prediction, with the CLIP term and without (CLIM: α = β = 0, its detector's
    softmax alone; ovdense: ``ensemble=False``), boxes and masks at the original image sizes, with the
    NAS-FPN levels and proposals on the way.

    ovdense's paths run from CLIM's four pyramid levels on (their simple pyramid's output is replaced
    by CLIM's; everything after — NAS-FPN, RPN, RoI heads, masks, and the CLIP term on ovdense's own
    dense CLIP map — is ovdense's): the tower and pyramid are the OV-COCO model's, equal to CLIM's to
    ~1e-6 and 2e-5 (test_fvit_official.py), and seven NAS-FPN stages carry that to ~2e-5 of the levels'
    size (``test_nasfpn_and_proposals_equal_clims`` measures it), enough to swap RPN proposals whose
    scores tie to 1e-5 and so change which boxes survive NMS."""
    out = {}
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        for ensemble in (True, False):
            if not ensemble:
                patch.setattr(models.clim.roi_head.bbox_head, "alpha", 0.0)
                patch.setattr(models.clim.roi_head.bbox_head, "beta", 0.0)
                patch.setattr(models.ovd.roi_head.bbox_head, "ensemble", False)
            taps = Taps()
            taps.output("fpn", models.clim.neck)
            taps.output("backbone", models.clim.backbone)
            taps.returned("proposals", models.clim.rpn_head, "predict")
            clim = [s.pred_instances for s in models.clim.predict(models.x, models.samples())]
            clim_taps = taps.close()
            levels = tuple(clim_taps["backbone"][:4])
            hooks = [_replace_output(models.ovd.backbone, levels),
                     _replace_output(models.plain.backbone.pyramid, levels)]
            try:
                taps = Taps()
                taps.returned("proposals", models.ovd.rpn_head, "predict")
                taps.output("fpn", models.ovd.neck)
                mm = [s.pred_instances for s in models.ovd.predict(models.x, models.samples())]
                mm_taps = taps.close()
                taps = Taps()
                taps.returned("features", models.plain, "features")
                taps.returned("proposals", models.plain.rpn_head, "predict")
                plain = models.plain.predict(models.x, METAS, models.text, models.seen, ensemble=ensemble)
                plain_taps = taps.close()
            finally:
                for hook in hooks:
                    hook.remove()
            out[ensemble] = dict(clim=clim, mm=mm, plain=plain,
                                 taps=dict(clim=clim_taps, mm=mm_taps, plain=plain_taps))
    return out


def test_config_is_clims(tmp_path):
    """configs/ovdet/fvit_vitb16_ovlvis_clim.py's numbers are those of CLIM's merged OV-LVIS config:
    the NAS-FPN, SyncBN everywhere, the box and mask heads, α/β/T, the class weights (866 base of 1203,
    background 0.9), the RPN and RoI test settings, the 640 test input and the mask metric."""
    from mmengine.config import Config

    tree = clim_checkout(tmp_path, ("ovdet/configs", METADATA + "lvis_v1_train_cat_norare_info.json"))
    theirs = Config.fromfile(str(tree / CLIM_LVIS_CONFIG))
    ours = Config.fromfile(str(CONFIG), import_custom_modules=False)
    a, b = _plain_value(theirs.model.to_dict()), _plain_value(ours.model.to_dict())
    assert a["neck"]["type"] == b["neck"]["type"] == "NASFPN"
    for key in ("in_channels", "out_channels", "num_outs", "stack_times", "norm_cfg"):
        assert a["neck"][key] == b["neck"][key], key
    assert a["backbone"]["norm_cfg"]["type"] == "SyncBN" and b["pyramid"] == {"norm": "sync_batch"}
    assert a["backbone"]["out_indices"] == list(b["indices"]) == [3, 5, 7, 11]
    assert Path(a["backbone"]["pretrained"]).name == Path(b["clip"]["pretrained"]).name
    for key in ("in_channels", "feat_channels", "num_convs", "anchor_generator", "bbox_coder"):
        assert a["rpn_head"][key] == b["rpn_head"][key], key
    for part in ("bbox_roi_extractor", "mask_roi_extractor"):
        assert a["roi_head"][part] == b["roi_head"][part], part
    ha, hb = a["roi_head"]["bbox_head"], b["roi_head"]["bbox_head"]
    for key in ("in_channels", "fc_out_channels", "roi_feat_size", "num_shared_convs", "num_shared_fcs",
                "num_cls_fcs", "num_reg_fcs", "norm_cfg", "reg_class_agnostic", "bbox_coder"):
        assert ha[key] == hb[key], key
    assert (ha["alpha"], ha["beta"], ha["clip_temp"], ha["cls_temp"]) \
        == (hb["alpha"], hb["beta"], hb["vlm_temperature"], hb["temperature"]) == (0.35, 0.65, 50.0, 50.0)
    ma, mb = a["roi_head"]["mask_head"], b["roi_head"]["mask_head"]
    for key in ("num_convs", "in_channels", "conv_out_channels", "class_agnostic", "norm_cfg"):
        assert ma[key] == mb[key], key
    # CLIM's class weights: its json's image_count > 0 (866) and the background's 0.9
    weights = json.loads((tree / METADATA / "lvis_v1_train_cat_norare_info.json").read_text())
    assert sum(c["image_count"] > 0 for c in weights) == hb["num_classes"] == 866
    assert ha["loss_cls"]["bg_weight"] == hb["loss_cls"]["class_weight"][-1] == 0.9
    assert a["test_cfg"] == b["test_cfg"]
    for cfg in (theirs, ours):
        steps = {step["type"]: step for step in cfg.test_dataloader.dataset.pipeline}
        assert tuple(steps["Resize"]["scale"]) == (640, 640) and steps["Resize"]["keep_ratio"]
        assert tuple(steps["Pad"]["size"]) == (640, 640)
        assert cfg.test_dataloader.dataset.ann_file == "annotations/lvis_v1_val.json"
        assert list(cfg.test_evaluator.metric) == ["segm"]


def test_nasfpn_and_proposals_equal_clims(models, passes):
    """The NAS-FPN's five levels (mmdet's NASFPN in the mm path, ovdense's own in the plain path) and the
    RPN proposals (nms_pre 2000, 1000 per image) against CLIM's, on CLIM's pyramid levels: equal to
    float32 rounding, in order. And each ovdense path from its own frozen tower and pyramid: the
    NAS-FPN levels within the measured ~2e-5 of their size (the tower's rounding after seven stages)."""
    taps = passes[True]["taps"]
    fpn_clim = taps["clim"]["fpn"]
    fpn_plain, _ = taps["plain"]["features"]
    assert [tuple(t.shape[-2:]) for t in fpn_clim] == [(56, 72), (28, 36), (14, 18), (7, 9), (3, 4)]
    for name, fpn in (("mm", taps["mm"]["fpn"]), ("plain", fpn_plain)):
        for i, (a, b) in enumerate(zip(fpn_clim, fpn)):
            scale = float(a.abs().max())
            assert 0.5 < scale < 100  # calibrated: neither vanishing nor blown up
            difference = report(f"LVIS {name} NAS-FPN P{i + 3} on CLIM's levels", max_diff(a, b))
            assert difference <= 2e-6 * scale
    with torch.no_grad():
        own = {"mm": models.ovd.extract_feat(models.x), "plain": models.plain.features(models.x, False)[0]}
    for name, fpn in own.items():
        for i, (a, b) in enumerate(zip(fpn_clim, fpn)):
            scale = float(a.abs().max())
            difference = report(f"LVIS {name} NAS-FPN P{i + 3} from its own tower (max |P| {scale:.3g})",
                                max_diff(a, b))
            assert difference <= 1e-4 * scale
    for k in range(len(METAS)):
        ref = taps["clim"]["proposals"][k].bboxes
        assert len(ref) == 1000
        mm, plain = taps["mm"]["proposals"][k].bboxes, taps["plain"]["proposals"][k]
        assert report(f"LVIS mm RPN boxes, image {k}, px", max_diff(ref, mm)) <= 5e-3
        assert report(f"LVIS plain RPN boxes, image {k}, px", max_diff(ref, plain)) <= 5e-3


def _masks(detections) -> torch.Tensor:
    return detections["masks"] if isinstance(detections, dict) else detections.masks


def _assert_same_detections_and_masks(tag: str, clim_dets, ours, seen: torch.Tensor | None) -> None:
    """Per image: ``DETECTIONS`` each, paired one to one as test_fvit_official.py pairs them (same label,
    nearest box and score; scores within 1e-4, boxes within 5e-3 original px, its ``FINAL_BOX_PX``), and
    on each pair the same instance mask but for pixels on a mask's edge that the ~1e-3 px box difference
    moves across the 0.5 threshold (at most 0.1 % of all mask pixels, and no mask with more than 2 % of
    its pixels changed)."""
    pairs = _assert_same_detections(tag, clim_dets, ours, seen, 5e-3, count=DETECTIONS)
    for k, ((i, j), a, b) in enumerate(zip(pairs, clim_dets, ours)):
        masks_a, masks_b = _masks(a), _masks(b)
        assert masks_a.shape == masks_b.shape and masks_a.shape[-2:] == METAS[k]["ori_shape"]
        ma, mb = masks_a[i].bool(), masks_b[j].bool()
        assert int(ma.sum()) > 0.05 * ma.numel() / DETECTIONS  # the masks are not empty
        changed = (ma ^ mb).flatten(1).sum(1).float()  # per mask
        share = float(changed.sum() / ma.sum().clamp(min=1))
        worst = float((changed / ma.flatten(1).sum(1).clamp(min=1)).max())
        assert report(f"{tag}, image {k}: mask pixels that differ (share)", share) <= 1e-3
        assert report(f"{tag}, image {k}: worst mask's share of differing pixels", worst) <= 2e-2


@pytest.mark.parametrize("ensemble", [True, False], ids=["with CLIP", "without CLIP"])
def test_whole_paths_equal_clims_predict(models, passes, ensemble):
    """``FVLM.predict`` (CLIM's OV-LVIS Mask R-CNN) against ``OvdenseFViT.predict`` (mm) and
    ``PlainFViT.predict`` (plain): 300 detections per image with the same labels, scores, boxes and masks;
    with the CLIP term the detections reach both seen (α) and unseen (β) classes."""
    got = passes[ensemble]
    tag = "with CLIP" if ensemble else "without CLIP"
    clim_base = models.clim.roi_head.bbox_head.class_weight[:-1] > 0  # CLIM's by position
    assert torch.equal(models.seen, clim_base)  # ovdense's by name
    for path in ("mm", "plain"):
        _assert_same_detections_and_masks(f"LVIS {path} whole path {tag} (original px)", got["clim"],
                                          got[path], models.seen if ensemble else None)
    if not ensemble:
        assert not torch.equal(got["clim"][0].scores, passes[True]["clim"][0].scores)  # the CLIP term counts
    np.testing.assert_array_less(0, [len(r.scores) for r in got["clim"]])
