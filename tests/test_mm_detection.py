"""F-ViT in mmdet 3.3 (ovdense/mm/detection.py) on the toy backbone: training, the ensemble path,
vocabulary swap, checkpoints, metric. Skipped without compiled mmcv."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmcv.ops", reason="needs full mmcv with compiled ops (python tools/misc/build_mmcv.py)")
pytest.importorskip("mmdet", reason="needs mmdet 3.3 (pip install -e '.[mm]')")

from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from tool_runs import load_tool

from ovdense.data import rle  # noqa: E402
from ovdense.data.synthetic import SceneConfig, open_vocabulary_split, render_scene  # noqa: E402
from ovdense.errors import OvdenseError  # noqa: E402
from ovdense.heads import fvit as det  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "ovdet" / "fvlm_toy_synthetic.py"
BASE, NOVEL = open_vocabulary_split()


def build_model(**overrides):
    from mmdet.registry import MODELS

    import ovdense.mm.detection  # noqa: F401 - registers the modules

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(CONFIG), import_custom_modules=False)
    cfg.model.train_cfg.rcnn.sampler.num = 64
    for key, value in overrides.items():
        cfg.model[key] = value
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def model():
    return build_model()


def scenes_batch(seeds, size=128, base_only=True):
    """Rendered scenes as mmdet's data-preprocessor input: uint8 BGR [3, H, W] and samples with
    gt boxes (x1, y1, x2, y2), labels (index into BASE) and masks; novel objects unlabelled."""
    inputs, samples = [], []
    for seed in seeds:
        scene = render_scene(np.random.default_rng([99, seed]), SceneConfig(size=(size, size)))
        boxes, labels, masks = [], [], []
        for index, obj in enumerate(scene.objects, start=1):
            name = f"{obj.colour} {obj.shape}"
            if base_only and name not in BASE:
                continue
            mask = scene.instance == index
            x, y, w, h = rle.bbox(mask)
            boxes.append([x, y, x + w, y + h])
            labels.append(BASE.index(name) if name in BASE else -1)  # -1: unlabelled (novel)
            masks.append(mask)
        shape = (size, size)
        sample = DetDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                                             scale_factor=(1.0, 1.0), img_id=seed))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.long),
            masks=BitmapMasks(np.array(masks, dtype=np.uint8).reshape(-1, size, size), size, size))
        inputs.append(torch.from_numpy(np.ascontiguousarray(scene.image[:, :, ::-1])).permute(2, 0, 1))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def test_backbone_never_in_state_dict_or_optimizer(model):
    names = list(model.state_dict())
    assert not any("visual" in n or "transformer.resblocks" in n for n in names)
    assert not any(n.endswith((".text", ".seen")) for n in names)  # the vocabulary comes from the text tower
    clip_params = {id(p) for p in model.clip.parameters()}
    assert not clip_params & {id(p) for p in model.parameters()}
    assert all(not p.requires_grad for p in model.clip.parameters())
    model.train()
    assert not model.clip.model.training


def test_extract_feat_feeds_the_fpn_fvits_pyramid(model):
    """mmdet's ``OvdenseFViT.extract_feat`` hands its FPN F-ViT's simple pyramid (written out in
    tests/test_detection.py from wusize/CLIPSelf's code, not ovdense's) of the frozen taps, on the
    model's own pyramid weights (the mmdet-side ``OvdenseFViTPyramid``, state-dict keys included)."""
    from test_detection import FVIT_TO_OVDENSE, fvit_pyramid_reference

    state = model.state_dict()
    params = {f"{f}.{k[len('backbone.pyramid.' + n) + 1:]}": v for f, n in FVIT_TO_OVDENSE.items()
              for k, v in state.items() if k.startswith(f"backbone.pyramid.{n}.")}
    assert len(params) == sum(k.startswith("backbone.") for k in state) == 8  # nothing else in the pyramid
    seen = []
    handle = model.neck.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    images = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    model.eval()
    try:
        with torch.no_grad():
            model.extract_feat(images)
    finally:
        handle.remove()
        model.roi_head.clip_context = None
    levels = det.frozen_features(model.clip, images, with_clip_map=False).levels
    for got, want in zip(seen[0], fvit_pyramid_reference(levels, params, "group")):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_loss_on_base_classes_only():
    model = build_model()
    batch = model.data_preprocessor(scenes_batch([1, 2]), training=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()
    totals = []
    for _ in range(8):
        losses = model.loss(batch["inputs"], batch["data_samples"])
        total, _ = model.parse_losses(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert np.mean(totals[-2:]) < 0.8 * np.mean(totals[:2]), totals
    head = model.roi_head.bbox_head
    assert head.num_classes == len(BASE)  # novel classes never entered training
    torch.testing.assert_close(head.text, model.clip.encode_text(BASE, model.templates))
    assert all(p.grad is None for p in model.clip.parameters())


def test_predict_swaps_vocabulary_and_relabels(model):
    model.eval()
    batch = model.data_preprocessor(scenes_batch([3, 4], base_only=False), training=False)
    all_classes = list(model.test_classes)
    with torch.no_grad():
        first = model.predict(batch["inputs"], [s.clone() for s in batch["data_samples"]])
    head = model.roi_head.bbox_head
    assert head.num_classes == 30
    assert head.seen.tolist() == [c in BASE for c in all_classes]  # novel classes get beta
    order = list(np.random.default_rng(0).permutation(len(all_classes)))
    model.set_test_classes([all_classes[i] for i in order])
    try:
        with torch.no_grad():
            second = model.predict(batch["inputs"], [s.clone() for s in batch["data_samples"]])
    finally:
        model.set_test_classes(all_classes)
    for a, b in zip(first, second):
        pa, pb = a.pred_instances, b.pred_instances
        assert len(pa) > 0 and len(pa) == len(pb)
        names_b = [all_classes[order[i]] for i in pb.labels.tolist()]
        key_a = sorted(zip(pa.scores.tolist(), [all_classes[i] for i in pa.labels.tolist()]))
        key_b = sorted(zip(pb.scores.tolist(), names_b))
        assert [n for _, n in key_a] == [n for _, n in key_b]
        np.testing.assert_allclose([s for s, _ in key_a], [s for s, _ in key_b], rtol=1e-5)
        ia, ib = pa.scores.argsort(), pb.scores.argsort()
        torch.testing.assert_close(pa.bboxes[ia], pb.bboxes[ib])
        assert pa.masks.shape[1:] == (128, 128)


def test_eval_scores_are_probabilities_not_softmaxed_twice(model):
    from mmengine.config import ConfigDict

    head = model.roi_head.bbox_head
    rois = torch.tensor([[0, 10.0, 10.0, 50.0, 50.0], [0, 60.0, 20.0, 90.0, 70.0]])
    scores = torch.tensor([[0.30, 0.05, 0.05, 0.60], [0.02, 0.70, 0.03, 0.25]])  # C = 3 + background
    head.num_classes = 3
    cfg = ConfigDict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.5), max_per_img=10)
    result = head._predict_by_feat_single(rois, scores, torch.zeros(2, 4), dict(img_shape=(128, 128)),
                                          rescale=False, rcnn_test_cfg=cfg)
    got = sorted(zip(result.scores.tolist(), result.labels.tolist()), reverse=True)
    want = sorted(((scores[r, c].item(), c) for r in range(2) for c in range(3) if scores[r, c] > 0.01),
                  reverse=True)
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], rtol=1e-6)
    assert [c for _, c in got] == [c for _, c in want]
    torch.testing.assert_close(result.bboxes[0], rois[1, 1:])  # zero deltas: the proposal itself
    model._vocabulary = None  # the vocabulary is set again on the next use


def test_mmcv_roi_align_equals_torchvision_path():
    from mmcv.ops import RoIAlign

    torch.manual_seed(0)
    clip_map = torch.nn.functional.normalize(torch.randn(2, 16, 9, 11), dim=1)
    rois = torch.tensor([[0, 3.0, 5.0, 60.0, 41.0], [1, 20.0, 0.0, 111.0, 95.0], [1, 7.3, 9.1, 9.9, 12.0]])
    mmcv_op = RoIAlign(output_size=1, spatial_scale=1 / 8, sampling_ratio=0, aligned=True,
                       use_torchvision=False)
    want = torch.nn.functional.normalize(mmcv_op(clip_map, rois)[:, :, 0, 0], dim=-1)
    torch.testing.assert_close(det.region_clip_embeddings(clip_map, rois, 8), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_threaded_roi_layers_are_mmcvs_bit_for_bit(model, monkeypatch, aligned):
    """The model's RoI extractors run mmcv's RoIAlign through ``ThreadedRoIAlign`` at inference: the
    same tensor as mmcv's own CPU kernel, bit for bit, with the RoIs split between two threads (and
    at one), on every level's scale and both RoI sizes; with a gradient, mmcv's op runs."""
    from mmcv.ops import RoIAlign

    from ovdense.detection import ops
    from ovdense.mm.detection import ThreadedRoIAlign

    for name in ("bbox_roi_extractor", "mask_roi_extractor"):
        layers = getattr(model.roi_head, name).roi_layers
        assert layers and all(isinstance(layer, ThreadedRoIAlign) for layer in layers), name
    torch.manual_seed(0)
    feats = torch.randn(2, 8, 37, 45)
    corners = torch.rand(300, 2) * 400
    rois = torch.cat([torch.randint(0, 2, (300, 1)).float(), corners, corners + torch.rand(300, 2) * 200], 1)
    rois[:5, 3:] = rois[:5, 1:3]  # empty boxes too
    for size, scale in ((7, 1 / 4), (14, 1 / 16), (1, 1 / 32)):
        mmcv_op = RoIAlign(size, scale, 0, aligned=aligned, use_torchvision=False)
        threaded = ThreadedRoIAlign(mmcv_op)
        want = mmcv_op(feats, rois)
        for threads in (2, 1):
            monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
            monkeypatch.setattr(ops, "PARALLEL_ROIS", 8)
            with torch.no_grad():
                got = threaded(feats, rois)
            assert torch.equal(got, want), (size, scale, threads)
    grad = threaded(feats.clone().requires_grad_(), rois)
    assert type(grad.grad_fn).__name__ == "RoIAlignFunctionBackward"


def test_head_checkpoint_round_trip_and_refusals(model, tmp_path, tiny_backbone):
    path = det.save_head(tmp_path / "fvit.safetensors", model.state_dict(), model.clip, {"classes": BASE})
    state, config = det.load_head(path, model.clip)
    fresh = build_model()
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    assert config["classes"] == BASE
    with pytest.raises(OvdenseError, match="trained on backbone"):
        det.load_head(path, tiny_backbone)
    with pytest.raises(OvdenseError, match="empty"):
        model.set_test_classes([])


def test_coco_metric_equals_pycocotools(tmp_path):
    """mmdet's CocoMetric on synthetic predictions equals pycocotools' COCOeval run here."""
    from mmdet.evaluation import CocoMetric
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    tool = load_tool("data/make_synthetic_detection")
    top = tool.write_detection_world(tmp_path, num_train=1, num_val=12, size=96)
    ann_file = str(top / "annotations" / "instances_val2017.json")
    gt = COCO(ann_file)
    names = [c["name"] for c in sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])]
    rng = np.random.default_rng(0)
    metric = CocoMetric(ann_file=ann_file, metric="bbox")
    metric.dataset_meta = dict(classes=tuple(names))
    detections = []
    for image_id in gt.getImgIds():
        boxes, scores, labels = [], [], []
        for ann in gt.loadAnns(gt.getAnnIds(imgIds=image_id)):
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 2.0, 4)
            label = ann["category_id"] - 1 if rng.random() > 0.2 else int(rng.integers(30))
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            scores.append(float(rng.random()))
            labels.append(label)
        boxes.append([5.0, 5.0, 40.0, 40.0])  # a false positive in every image
        scores.append(0.5)
        labels.append(int(rng.integers(30)))
        pred = dict(bboxes=torch.tensor(boxes, dtype=torch.float32), scores=torch.tensor(scores),
                    labels=torch.tensor(labels))
        metric.process({}, [dict(img_id=image_id, ori_shape=(96, 96), pred_instances=pred)])
        for b, s, c in zip(boxes, scores, labels):
            detections.append({"image_id": image_id, "category_id": c + 1, "score": s,
                               "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    got = metric.evaluate(size=len(gt.getImgIds()))
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert got["coco/bbox_mAP"] == pytest.approx(round(evaluator.stats[0], 3), abs=1e-9)
    assert got["coco/bbox_mAP_50"] == pytest.approx(round(evaluator.stats[1], 3), abs=1e-9)
    assert 0.2 < evaluator.stats[1] < 1.0  # a test that can fail both ways


def test_detector_api_equals_the_model(model, tmp_path, tiny_backbone):
    from ovdense.heads.fvit import Detector  # plain torch; ovdense.mm.detection re-exports it
    from ovdense.mm.detection import export_head

    path = export_head(model, tmp_path / "fvit_head.safetensors")
    scene = render_scene(np.random.default_rng([99, 7]), SceneConfig(size=(128, 128)))
    detector = Detector(model.clip, list(model.test_classes), path, score_threshold=0.0)
    result = detector.predict(scene.image)
    model.eval()
    batch = model.data_preprocessor(scenes_batch([7], base_only=False), training=False)
    with torch.no_grad():
        want = model.predict(batch["inputs"], batch["data_samples"])[0].pred_instances
    np.testing.assert_allclose(result.boxes, want.bboxes.numpy(), atol=1e-4)
    np.testing.assert_allclose(result.scores, want.scores.numpy(), atol=1e-6)
    assert result.class_ids.tolist() == want.labels.tolist()
    assert result.masks.shape == (len(result.boxes), 128, 128) and result.masks.dtype == bool
    with pytest.raises(OvdenseError, match="no F-ViT head ships.*tools/train.py.*head_checkpoint"):
        Detector(tiny_backbone, ["red circle"])  # no head ships for it


def test_novel_shape_split_config_data_and_model_agree(tmp_path):
    """``configs/ovdet/fvlm_toy_synthetic_novel_star.py`` and ``make_synthetic_detection.py
    --novel-shape star`` name the same split (``open_vocabulary_split("star")``: the 6 star pairs novel,
    24 base): the training json holds no star, the held-out json every pair; the config's head has 24
    base columns (25 class weights, the background's 0.6) and builds."""
    import json

    from mmdet.registry import MODELS

    import ovdense.mm.detection  # noqa: F401 - registers the modules

    base, novel = open_vocabulary_split("star")
    assert len(base) == 24 and novel == [f"{c} star" for c in ("red", "green", "blue", "yellow", "purple",
                                                                 "orange")]
    assert open_vocabulary_split() == (BASE, NOVEL)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        open_vocabulary_split("hexagon")
    writer = load_tool("data/make_synthetic_detection")
    top = writer.write_detection_world(tmp_path, 12, 6, novel_shape="star")
    train = json.loads((top / "annotations" / "instances_train2017.json").read_text())
    val = json.loads((top / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    assert sorted(c["name"] for c in train["categories"]) == sorted(base) and len(names) == 30
    assert train["annotations"] and all("star" not in names[a["category_id"]] for a in train["annotations"])
    assert any("star" in names[a["category_id"]] for a in val["annotations"])

    star = CONFIG.with_name("fvlm_toy_synthetic_novel_star.py")
    cfg = Config.fromfile(str(star), import_custom_modules=False)
    head = cfg.model.roi_head.bbox_head
    assert cfg.model.classes == base and head.num_classes == 24 == cfg.model.roi_head.mask_head.num_classes
    assert head.loss_cls.class_weight == [1.0] * 24 + [0.6]
    assert list(cfg.train_dataloader.dataset.dataset.metainfo.classes) == base
    assert list(cfg.val_dataloader.dataset.metainfo.novel_classes) == novel
    assert sorted(cfg.model.test_classes) == sorted(base + novel)
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    assert model.roi_head.bbox_head.num_classes == 24 and model.classes == base
