"""F-ViT inference in plain torch (ovdense/heads/fvit.py: ``PlainFViT``, ``Detector``) against
mmdet 3.3's own predict (ovdense/mm/detection.py ``OvdenseFViT``) on the same random head: boxes,
scores, labels and masks; the pieces (RoIAlign, preprocessing) against mmcv/mmdet; no mmcv needed;
bad inputs. The mmdet comparisons skip without compiled mmcv."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ovdense.data.synthetic import SceneConfig, open_vocabulary_split, render_scene
from ovdense.errors import OvdenseError
from ovdense.heads import fvit as det

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "ovdet" / "fvlm_toy_synthetic.py"
BASE, NOVEL = open_vocabulary_split()
ALL = BASE + NOVEL
UNSEEN_WORDS = ["red square", "zebra", "blue ring", "a purple star", "kettle", "green circle"]


def head_config() -> dict:
    """The toy config's model dict as ``OvdenseFViT.head_config`` (read without mmengine)."""
    model = runpy.run_path(str(CONFIG))["model"]
    keys = ("classes", "neck", "rpn_head", "roi_head", "test_cfg", "method", "pyramid")
    return {**{k: model[k] for k in keys}, "templates": None, "indices": None}


@pytest.fixture(scope="module")
def plain_head(toy, tmp_path_factory):
    """A random head written without mmdet (``PlainFViT``'s own state dict, same keys)."""
    torch.manual_seed(0)
    model = det.PlainFViT(toy, head_config())
    path = tmp_path_factory.mktemp("plain") / "fvit_head.safetensors"
    return det.save_head(path, model.state_dict(), toy, head_config())


def scene(seed: int, size=(128, 128)) -> np.ndarray:
    return render_scene(np.random.default_rng([99, seed]), SceneConfig(size=size)).image


# --------------------------------------------------------------------------------------------
# Against mmdet


def build_mm_model(with_mask: bool = True):
    pytest.importorskip("mmcv.ops",
                        reason="needs full mmcv with compiled ops (python tools/misc/build_mmcv.py)")
    pytest.importorskip("mmdet", reason="needs mmdet 3.3 (pip install -e '.[mm]')")
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import ovdense.mm.detection  # noqa: F401 - registers the modules

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIG), import_custom_modules=False)
    if not with_mask:  # Faster R-CNN: boxes only (mmdet rescales them in the box head then)
        cfg.model.roi_head.pop("mask_head")
        cfg.model.roi_head.pop("mask_roi_extractor")
    # seed 3: on the shipped toy CLIP this random head's detections of every test image reach both
    # seen and unseen classes, with and without the ensemble (seed 0 did on the first toy model)
    torch.manual_seed(3)
    model = MODELS.build(cfg.model)
    model.init_weights()
    with torch.no_grad():  # a wider RPN and box-delta spread: proposals and boxes of many sizes and levels
        model.rpn_head.rpn_reg.weight.mul_(4.0)
        model.roi_head.bbox_head.fc_reg.weight.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    from ovdense.mm.detection import export_head

    model = build_mm_model()
    return model, export_head(model, tmp_path_factory.mktemp("mm") / "fvit_head.safetensors")


def mmdet_predict(model, rgb: np.ndarray, image_size: int, classes, ensemble: bool):
    """mmdet's path, as ovdense's Detector ran it before the plain path: cv2 resize of the long
    side, DetDataPreprocessor on BGR uint8, ``OvdenseFViT.predict(rescale=True)``."""
    import cv2
    from mmdet.structures import DetDataSample

    H, W = rgb.shape[:2]
    factor = image_size / max(H, W)
    h, w = max(1, int(H * factor + 0.5)), max(1, int(W * factor + 0.5))
    resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    bgr = torch.from_numpy(np.ascontiguousarray(resized[:, :, ::-1])).permute(2, 0, 1)
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(H, W), scale_factor=(w / W, h / H)))
    data = model.data_preprocessor(dict(inputs=[bgr], data_samples=[sample]), training=False)
    model.set_test_classes(list(classes))
    model.roi_head.bbox_head.ensemble = ensemble
    with torch.no_grad():
        pred = model.predict(data["inputs"], data["data_samples"], rescale=True)[0].pred_instances
    return pred, data["inputs"]


def assert_same(got, want, masks: bool = True):
    assert len(got.boxes) == len(want.bboxes) > 0
    np.testing.assert_allclose(got.boxes, want.bboxes.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.scores, want.scores.numpy(), atol=1e-4, rtol=0)
    assert got.class_ids.tolist() == want.labels.tolist()
    if masks:
        reference = want.masks.numpy().astype(bool)
        assert got.masks.shape == reference.shape and got.masks.dtype == bool
        assert (got.masks == reference).mean() >= 0.999
        assert 0 < got.masks.mean() < 0.5  # non-trivial masks
    else:
        assert got.masks is None


@pytest.mark.parametrize("ensemble", [True, False])
@pytest.mark.parametrize("vocabulary", ["all", "unseen words"])
def test_plain_path_equals_mmdet_predict(mm, ensemble, vocabulary):
    model, path = mm
    classes = ALL if vocabulary == "all" else UNSEEN_WORDS
    detector = det.Detector(model.clip, classes, path, score_threshold=0.0, ensemble=ensemble)
    assert detector.classes == classes
    seen = [c in BASE for c in classes]
    for rgb in (scene(7), scene(8, (96, 150)), scene(9, (48, 40))):  # equal, down- and up-scaled
        got = detector.predict(rgb)
        want, inputs = mmdet_predict(model, rgb, detector.image_size, classes, ensemble)
        torch.testing.assert_close(detector.preprocess(rgb)[0], inputs, atol=0, rtol=0)
        assert_same(got, want)
        assert got.boxes[:, 2:].max() > 0.5 * max(rgb.shape[:2])  # boxes in input-image pixels
        assert {seen[c] for c in got.class_ids} == {True, False}  # both α and β columns reached


def test_box_only_head_equals_mmdet(tmp_path):
    """Faster R-CNN (no mask head): mmdet rescales boxes in the box head (a multiplication),
    with a mask head in the mask head (a division); both are followed."""
    from ovdense.mm.detection import export_head

    model = build_mm_model(with_mask=False)
    path = export_head(model, tmp_path / "faster.safetensors")
    detector = det.Detector(model.clip, ALL, path, score_threshold=0.0)
    rgb = scene(8, (96, 150))
    want, _ = mmdet_predict(model, rgb, detector.image_size, ALL, True)
    assert_same(detector.predict(rgb), want, masks=False)


def test_batch_of_two_equals_mmdet(mm):
    """``PlainFViT.predict`` on a padded batch of two images (RoIs of both images in one pass)."""
    from mmdet.structures import DetDataSample

    model, path = mm
    detector = det.Detector(model.clip, ALL, path, score_threshold=0.0)
    inputs, samples = [], []
    for seed, (h, w) in ((3, (128, 96)), (4, (112, 128))):
        bgr = np.ascontiguousarray(scene(seed, (h, w))[:, :, ::-1])
        inputs.append(torch.from_numpy(bgr).permute(2, 0, 1))  # 3, h, w
        meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0))
        samples.append(DetDataSample(metainfo=meta))
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=False)
    model.set_test_classes(ALL)
    model.roi_head.bbox_head.ensemble = True
    with torch.no_grad():
        want = model.predict(data["inputs"], data["data_samples"], rescale=True)
    metas = [s.metainfo for s in data["data_samples"]]
    got = detector.model.predict(data["inputs"], metas, detector.text, detector.seen)
    for g, w in zip(got, want):
        w = w.pred_instances
        assert len(g["bboxes"]) == len(w.bboxes) > 0
        torch.testing.assert_close(g["bboxes"], w.bboxes, atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], w.scores, atol=1e-4, rtol=0)
        assert torch.equal(g["labels"], w.labels)
        assert (g["masks"] == w.masks).float().mean() >= 0.999


@pytest.mark.parametrize("output_size, scale", [(7, 1 / 4), (14, 1 / 8), (7, 1 / 16)])
def test_torchvision_roi_align_equals_mmcv(output_size, scale):
    """mmcv's RoIAlign(aligned=True, sampling_ratio=0), what mmdet's SingleRoIExtractor runs, is
    torchvision's roi_align(aligned=True) (boxes tiny, large, partly outside the map)."""
    pytest.importorskip("mmcv.ops", reason="needs full mmcv with compiled ops")
    from mmcv.ops import RoIAlign
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 13, 17, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([17, 13]) / scale
    wh = torch.rand(40, 2, generator=g) ** 3 * 12 / scale + 0.1
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), xy - 0.2 * wh, xy + wh], dim=1)
    want = RoIAlign(output_size, scale, sampling_ratio=0, aligned=True)(feats, rois)
    got = roi_align(feats, rois, output_size, spatial_scale=scale, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Without mmcv, file formats, bad inputs


def test_detector_needs_no_openmmlab(plain_head):
    """A fresh interpreter where importing mmcv, mmdet or mmengine fails runs the detector."""
    code = f"""
import sys
for name in ("mmcv", "mmdet", "mmengine"):
    sys.modules[name] = None  # any import of them raises ImportError
import numpy as np
from ovdense import create_backbone
from ovdense.heads.fvit import Detector
detector = Detector(create_backbone("toy"), ["red circle", "zebra"], {str(plain_head)!r}, score_threshold=0.0)
result = detector.predict(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
assert len(result.boxes) > 0 and result.masks.shape == (len(result.boxes), 40, 56), result
openmmlab = ("mmcv", "mmdet", "mmengine")
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in openmmlab)
assert not loaded, loaded
print("detections", len(result.boxes))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("detections ")


def test_float16_head_is_half_the_file_and_loads_as_float32(toy, plain_head, tmp_path):
    state, config = det.load_head(plain_head, toy)
    half = det.save_head(tmp_path / "half.safetensors", state, toy, config, dtype=torch.float16)
    assert half.stat().st_size < 0.55 * plain_head.stat().st_size
    loaded, loaded_config = det.load_head(half, toy)
    assert loaded_config == config
    for key, value in state.items():
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], value.half().float(), atol=0, rtol=0)
    rgb = scene(5)
    a = det.Detector(toy, ALL, half, score_threshold=0.0).predict(rgb)
    b = det.Detector(toy, ALL, plain_head, score_threshold=0.0).predict(rgb)
    assert len(a.boxes) > 0 and len(b.boxes) > 0  # fp16 rounding moves scores slightly, nothing breaks


def test_default_head_checkpoint(toy, tiny_backbone, monkeypatch):
    assert det.default_head_checkpoint(tiny_backbone) is None
    # a file that is in ovdense/assets
    monkeypatch.setitem(det.TOY_HEAD_FILES, "toy", "toy-clip.json")
    assert det.default_head_checkpoint(toy) == ROOT / "ovdense" / "assets" / "toy-clip.json"
    monkeypatch.setitem(det.TOY_HEAD_FILES, "toy", "no-such-head.safetensors")
    assert det.default_head_checkpoint(toy) is None
    with pytest.raises(OvdenseError, match="tools/train.py configs/ovdet/fvlm_toy_synthetic.py.*head_check"):
        det.Detector(toy, ["red circle"])


def test_shipped_toy_head_finds_held_out_objects(toy, tmp_path):
    """The shipped head (``ovdense/assets/fvit-toy-head.safetensors``) through the public path
    (``Detector`` with no head named: ``default_head_checkpoint``), the 30 pairs as vocabulary, F-ViT's
    ensemble, on the first 12 held-out scenes of the world it was trained beside
    (``tools/data/make_synthetic_detection.py``, seed 0: 24 objects of 15 pairs, 6 of them of 4 novel
    pairs), box AP50 by pycocotools' COCOeval (``tools/analysis/eval_detect_toy.py``'s scoring). Measured
    on the v2 toy model's head: 0.945 over all pairs, 0.924 base, 1.000 novel (docs/toy_world.md, 100
    scenes: 0.798 / 0.886 / 0.623); floors a little below (the first toy's head: 0.830 / 0.864 /
    0.737 under floors of 0.75 / 0.75 / 0.6, now tightened)."""
    from tool_runs import load_tool

    from ovdense.backbone.clip import ASSETS

    assert det.default_head_checkpoint(toy) == ASSETS / "fvit-toy-head.safetensors"
    scoring = load_tool("analysis/eval_detect_toy")
    world = load_tool("data/make_synthetic_detection")
    world.write_detection_world(tmp_path, num_train=1, num_val=12, seed=0)
    truth, categories = scoring.load_held_out(tmp_path)
    names = [c["name"] for c in categories]
    assert sorted(names) == sorted(ALL)
    detector = det.Detector(toy, names, score_threshold=0.0)
    rows = []
    for image in truth.loadImgs(truth.getImgIds()):
        result = detector.predict(tmp_path / "coco" / "val2017" / image["file_name"])
        for box, score, k in zip(result.boxes.tolist(), result.scores.tolist(), result.class_ids.tolist()):
            rows.append(dict(image_id=image["id"], category_id=categories[k]["id"], score=score,
                             bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
    novel_ids = {c["id"] for c in categories if c["name"] in NOVEL}
    figures = scoring.evaluate(truth, rows, "bbox", novel_ids)
    assert len(truth.getAnnIds()) == 24 and len({a["category_id"] for a in truth.loadAnns(truth.getAnnIds())}
                                                 & novel_ids) >= 4
    assert figures["ap50"] > 0.85 and figures["base_ap50"] > 0.85 and figures["novel_ap50"] > 0.8, figures


def test_eval_detect_toy_beta_and_temperature_sweep(toy, tmp_path, capsys):
    """``tools/analysis/eval_detect_toy.py --beta … --temperature …``: at the head's own β (0.8) and
    temperature (the toy's logit scale) the sweep scores what the ensemble run scores; β = 0 changes
    the novel pairs' scores (and not the base pairs'), and so does another temperature (the base pairs'
    too, through α), so the sweep reads both."""
    import json

    from tool_runs import load_tool

    load_tool("data/make_synthetic_detection").write_detection_world(tmp_path, num_train=1, num_val=8, seed=0)
    out = tmp_path / "report.json"
    own = f"{toy.logit_scale:g}"
    assert load_tool("analysis/eval_detect_toy").main(["--data", str(tmp_path), "--beta", "0.8", "0",
                                                       "--temperature", repr(toy.logit_scale), "5",
                                                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sweep = report["sweep (box)"]
    assert sorted(sweep) == sorted(f"beta={b} T={t}" for b in ("0.8", "0") for t in (own, "5"))
    assert sweep[f"beta=0.8 T={own}"] == report["with CLIP term"]["bbox"]
    # β moves only the novel pairs' scores; on these 8 scenes the shipped head's novel AP50 is 1.0 at
    # both β, so the change shows in AP over the IoU thresholds (0.683 at β = 0.8, 0.703 at 0)
    assert sweep[f"beta=0 T={own}"]["base_ap50"] == sweep[f"beta=0.8 T={own}"]["base_ap50"]
    assert sweep[f"beta=0 T={own}"]["ap"] != sweep[f"beta=0.8 T={own}"]["ap"]
    assert sweep["beta=0.8 T=5"]["ap"] != sweep[f"beta=0.8 T={own}"]["ap"]
    assert f"beta=0.8 T={own}" in capsys.readouterr().out


def one_line_error(call, match: str) -> None:
    with pytest.raises(OvdenseError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_bad_inputs_give_one_error_each(toy, tiny_backbone, plain_head, tmp_path):
    from safetensors.torch import save_file

    state, config = det.load_head(plain_head, toy)
    one_line_error(lambda: det.Detector(toy, ALL, tmp_path / "missing.safetensors"), "not found")
    torch.save(state, tmp_path / "head.pth")
    one_line_error(lambda: det.Detector(toy, ALL, tmp_path / "head.pth"), "not a safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    one_line_error(lambda: det.Detector(toy, ALL, tmp_path / "other.safetensors"), "not an ovdense F-ViT")
    one_line_error(lambda: det.Detector(tiny_backbone, ALL, plain_head), "trained on backbone")
    one_line_error(lambda: det.Detector(toy, [], plain_head), "empty")
    one_line_error(lambda: det.Detector(toy, ["red circle", "red circle"], plain_head), "twice")
    one_line_error(lambda: det.Detector(toy, ALL, plain_head, score_threshold=1.5), "score_threshold")
    partial = {k: v for k, v in state.items() if not k.startswith("roi_head.mask_head.conv_logits")}
    det.save_head(tmp_path / "partial.safetensors", partial, toy, config)
    one_line_error(lambda: det.Detector(toy, ALL, tmp_path / "partial.safetensors"), "missing.*conv_logits")
    rcnn = {k: v for k, v in config["test_cfg"]["rcnn"].items() if k != "mask_thr_binary"}
    det.save_head(tmp_path / "nothr.safetensors", state, toy, {**config, "test_cfg": {**config["test_cfg"],
                                                                                   "rcnn": rcnn}})
    one_line_error(lambda: det.Detector(toy, ALL, tmp_path / "nothr.safetensors"), "rcnn.mask_thr_binary")
    other = {**config, "neck": {**config["neck"], "type": "PAFPN"}}
    det.save_head(tmp_path / "pafpn.safetensors", state, toy, other)
    one_line_error(lambda: det.Detector(toy, ALL, tmp_path / "pafpn.safetensors"), "not reproduce.*PAFPN")


def test_degenerate_images_and_empty_results(toy, plain_head, monkeypatch):
    detector = det.Detector(toy, ALL, plain_head, score_threshold=0.0)
    for rgb in (np.zeros((1, 300, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)):
        result = detector.predict(rgb)
        assert result.masks.shape == (len(result.boxes), *rgb.shape[:2])
        assert np.isfinite(result.boxes).all() and (result.boxes[:, 2:] <= [rgb.shape[1], rgb.shape[0]]).all()
    nothing = det.Detector(toy, ALL, plain_head, score_threshold=1.0).predict(scene(5))
    assert nothing.boxes.shape == (0, 4) and nothing.scores.shape == (0,)
    assert nothing.masks.shape == (0, 128, 128)
    monkeypatch.setattr(detector.model.rpn_head, "predict", lambda x, metas, cfg: [x[0].new_zeros(0, 4)])
    none = detector.predict(scene(5))  # no proposal at all
    assert none.boxes.shape == (0, 4) and none.masks.shape == (0, 128, 128)
    assert none.class_ids.dtype == np.int64
