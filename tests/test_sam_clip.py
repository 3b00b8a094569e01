"""SAM + CLIP (``heads/sam_clip.py``): proposals, mask-pooled classification, the semantic map's
overlap rule, COCO RLE, weights loading, the CLI.

The SAM used here has random weights and, to run on a CPU in seconds, a small image encoder (width
32, two windowed blocks) built by segment-anything's own private builder ``_build_sam`` (the
prompt encoder and mask decoder are SAM's); ViT-B at 1024 px takes about 40 s per image here.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

segment_anything = pytest.importorskip("segment_anything")
mask_utils = pytest.importorskip("pycocotools.mask")

from PIL import Image  # noqa: E402
from segment_anything import SamAutomaticMaskGenerator, SamPredictor  # noqa: E402
from segment_anything.build_sam import _build_sam  # noqa: E402

from ovdense.cli import main  # noqa: E402
from ovdense.data import rle as ovdense_rle  # noqa: E402
from ovdense.data.synthetic import SceneConfig, render_scene  # noqa: E402
from ovdense.errors import OvdenseError  # noqa: E402
from ovdense.heads.sam_clip import (  # noqa: E402
    SamClipSegmenter,
    classify_masks,
    draw_instances,
    load_sam,
    semantic_map,
)

CLASSES = ["background", "red, crimson", "blue", "green"]
AUTO = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def tiny_sam():
    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                      encoder_global_attn_indexes=[], checkpoint=None)


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


@pytest.fixture(scope="module")
def scene():
    scene = render_scene(3, SceneConfig(size=(48, 64), objects=(3, 3)))
    assert len(scene.objects) == 3
    return scene


def make(backbone, sam=None, **kwargs):
    kwargs.setdefault("templates", "single")
    kwargs.setdefault("short_side", 0)  # 48×64 px: a 6×8 grid of the tiny ViT
    return SamClipSegmenter(backbone, sam, CLASSES, **kwargs)


def overlap_rule(masks, labels, scores):
    """The semantic map, pixel by pixel: the best-scoring covering mask (first on ties)."""
    M, H, W = masks.shape
    out_labels, out_scores = np.zeros((H, W), np.int64), np.zeros((H, W), np.float32)
    for y in range(H):
        for x in range(W):
            covering = [m for m in range(M) if masks[m, y, x]]
            if covering:
                best = max(covering, key=lambda m: (scores[m], -m))
                out_labels[y, x], out_scores[y, x] = max(labels[best], 0), scores[best]
    return out_labels, out_scores


def decode(segmentation):
    """A JSON RLE (``counts`` text) decoded by pycocotools: ``[H, W]`` bool."""
    return mask_utils.decode({**segmentation, "counts": segmentation["counts"].encode()}).astype(bool)


def check_semantic_map(result):
    masks = np.stack([i.mask for i in result.instances])
    want_labels, want_scores = overlap_rule(masks, [i.label for i in result.instances],
                                            [i.score for i in result.instances])
    np.testing.assert_array_equal(result.labels, want_labels)
    np.testing.assert_allclose(result.scores, want_scores)


# --------------------------------------------------------------------------------------------
# Classification


def pooled_by_loop(features, mask):
    """Area-weighted mean of ``features [D, h, w]`` under ``mask [H, W]``: each cell weighs the
    fraction of its pixels (adaptive pooling's cells: rows floor(i·H/h) … ceil((i+1)·H/h)) the
    mask covers."""
    D, h, w = features.shape
    H, W = mask.shape
    total, weight = torch.zeros(D, dtype=torch.float64), 0.0
    for i in range(h):
        for j in range(w):
            y0, y1 = math.floor(i * H / h), math.ceil((i + 1) * H / h)
            x0, x1 = math.floor(j * W / w), math.ceil((j + 1) * W / w)
            frac = float(mask[y0:y1, x0:x1].double().mean())
            total += frac * features[:, i, j].double()
            weight += frac
    return total / weight if weight > 0 else None


@pytest.mark.parametrize("size", [(24, 32), (25, 37)])  # cells of whole pixels, and of fractions
def test_classify_masks_against_a_per_mask_loop(size):
    gen = torch.Generator().manual_seed(0)
    D, h, w, Q = 8, 6, 8, 5
    features = F.normalize(torch.randn(1, D, h, w, generator=gen), dim=1)
    text = F.normalize(torch.randn(Q, D, generator=gen), dim=1)
    class_of_prompt = torch.tensor([0, 1, 1, 2, 2])  # classes 1 and 2 have synonyms
    masks = torch.rand(1, 5, *size, generator=gen) > 0.6
    masks[0, 3] = False  # zero area
    masks[0, 4] = False
    masks[0, 4, 2:5, 3:9] = True  # a small box
    crops = F.normalize(torch.randn(1, 5, D, generator=gen), dim=-1)
    weight = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.8]])
    labels, scores, probs = classify_masks(features, masks, text, class_of_prompt, 20.0,
                                           crop_embeddings=crops, crop_weight=weight)
    assert labels.shape == scores.shape == (1, 5) and probs.shape == (1, 5, 3)
    for m in range(5):
        pooled = pooled_by_loop(features[0], masks[0, m])
        if pooled is None:
            assert (labels[0, m], scores[0, m]) == (-1, 0.0)
            continue
        e = pooled / pooled.norm()
        e = (1 - weight[0, m]) * e + weight[0, m] * crops[0, m].double()
        e = e / e.norm()
        prompt_probs = torch.softmax(20.0 * text.double() @ e, dim=0)
        want = torch.stack([prompt_probs[class_of_prompt == c].max() for c in range(3)])
        torch.testing.assert_close(probs[0, m].double(), want, atol=1e-5, rtol=1e-5)
        assert labels[0, m] == want.argmax() and abs(float(scores[0, m]) - float(want.max())) < 1e-5
    plain_labels, plain_scores, _ = classify_masks(features, masks, text, class_of_prompt, 20.0)
    best = int(plain_scores[0].argmax())  # with the best score as threshold, the others are unknown
    labels_t, _, _ = classify_masks(features, masks, text, class_of_prompt, 20.0,
                                    unknown_threshold=float(plain_scores[0, best]))
    assert labels_t[0].tolist() == [int(plain_labels[0, m]) if m == best else -1 for m in range(5)]


def test_semantic_map_follows_the_overlap_rule(rng):
    masks = torch.from_numpy(rng.random((7, 12, 16)) > 0.55)
    masks[6] = False  # covers nothing
    scores = torch.tensor([0.3, 0.9, 0.5, 0.9, 0.2, 0.7, 1.0])  # masks 1 and 3 tie
    labels = torch.tensor([1, 2, -1, 3, 2, -1, 4])
    got_labels, got_scores = semantic_map(masks, labels, scores)
    want_labels, want_scores = overlap_rule(masks.numpy(), labels.tolist(), scores.tolist())
    np.testing.assert_array_equal(got_labels.numpy(), want_labels)
    np.testing.assert_allclose(got_scores.numpy(), want_scores)
    assert (got_labels.numpy()[~masks.numpy().any(0)] == 0).all()


# --------------------------------------------------------------------------------------------
# The pipeline with a random-weight SAM


def test_automatic_masks_one_sam_and_one_clip_pass(tiny_backbone, sam, scene, monkeypatch):
    seg = make(tiny_backbone, sam, **AUTO)
    calls = {"sam": 0, "clip": 0}
    hook = sam.image_encoder.register_forward_hook(lambda *a: calls.__setitem__("sam", calls["sam"] + 1))
    encode_dense = tiny_backbone.encode_dense

    def counted(*args, **kwargs):
        calls["clip"] += 1
        return encode_dense(*args, **kwargs)

    monkeypatch.setattr(tiny_backbone, "encode_dense", counted)
    try:
        seg.set_image(scene.image)
        auto = seg.predict()
        prompted = seg.predict(points=[[20, 20]], boxes=[[0, 0, 30, 30]])
    finally:
        hook.remove()
    assert calls == {"sam": 1, "clip": 1}
    # the same masks, in the same order, as segment-anything's own generator
    generated = SamAutomaticMaskGenerator(sam, points_per_side=2, pred_iou_thresh=0.0,
                                          stability_score_thresh=0.0).generate(scene.image)
    assert len(auto.instances) == len(generated) > 0
    for inst, ann in zip(auto.instances, generated):
        np.testing.assert_array_equal(inst.mask, ann["segmentation"])
        assert inst.area == ann["area"]  # (SAM's boxes are one pixel narrower than COCO's)
    for result in (auto, prompted):
        assert result.labels.shape == result.scores.shape == (48, 64)
        assert result.classes == ("background", "red", "blue", "green")
        check_semantic_map(result)
    assert len(prompted.instances) == 2
    picture = draw_instances(scene.image, auto)
    assert picture.shape[1] == 64 + 200 and picture.dtype == np.uint8


def test_point_and_box_prompts_match_sam_predictor(tiny_backbone, sam, scene):
    seg = make(tiny_backbone, sam, points_per_batch=2)  # three points: two batches
    points = np.array([[10.0, 12.0], [40.0, 30.0], [60.0, 5.0]])
    boxes = np.array([[5.0, 5.0, 30.0, 40.0]])
    result = seg.segment(scene.image, points=points, boxes=boxes)
    predictor = SamPredictor(sam)
    predictor.set_image(scene.image)
    for inst, point in zip(result.instances, points):
        masks, iou, _ = predictor.predict(point_coords=point[None], point_labels=np.array([1]))
        np.testing.assert_array_equal(inst.mask, masks[iou.argmax()])
    masks, _, _ = predictor.predict(box=boxes[0], multimask_output=False)
    np.testing.assert_array_equal(result.instances[3].mask, masks[0])
    assert len(result.instances) == 4


def test_crop_refinement_blends_small_masks_only(tiny_backbone, scene):
    masks = np.stack([scene.instance == i for i in (1, 2, 3)] + [np.zeros((48, 64), bool)])
    masks[3, 40:44, 0:4] = True  # 16 px: small
    small_area = 0.01
    base = make(tiny_backbone).segment(scene.image, masks=masks)
    seg = make(tiny_backbone, crop_area=small_area, crop_weight=1.0)  # λ = 1: the crop's own class
    refined = seg.segment(scene.image, masks=masks)
    for m in range(4):
        if masks[m].sum() >= small_area * masks[m].size:
            assert refined.instances[m].score == pytest.approx(base.instances[m].score, abs=1e-6)
    # the small mask's class comes from its masked crop: box, outside at the mean colour (0), native size
    x = tiny_backbone.to_tensor(scene.image)[0]
    crop = x[:, 40:44, 0:4]  # the mask fills its box
    crop = F.interpolate(crop[None], size=tiny_backbone.native_size, mode="bicubic", align_corners=False)
    with torch.no_grad():
        embedding = tiny_backbone.encode_image(crop)[0]
    probs = torch.softmax(seg.logit_scale * seg.text @ embedding, dim=0)
    want = torch.stack([probs[seg.class_of_prompt == c].max() for c in range(len(CLASSES))])
    assert refined.instances[3].score == pytest.approx(float(want.max()), abs=1e-5)
    assert refined.instances[3].label == int(want.argmax())


# --------------------------------------------------------------------------------------------
# Outputs and degenerate input


def test_rle_round_trips_through_pycocotools(tiny_backbone, scene):
    masks = np.stack([scene.instance == i for i in (1, 2, 3)])
    masks[1, 0, 0] = True  # a pixel in the corner: a leading run of ones
    result = make(tiny_backbone).segment(scene.image, masks=masks)
    entries = result.to_coco("scene")
    json.dumps(entries)  # serialisable
    for inst, entry, mask in zip(result.instances, entries, masks):
        segm = entry["segmentation"]
        np.testing.assert_array_equal(decode(segm), mask)
        assert segm == ovdense_rle.encode(mask)  # ovdense's plain-numpy encoder agrees
        assert entry["area"] == int(mask_utils.area(segm)) == int(mask.sum())
        assert entry["bbox"] == mask_utils.toBbox(segm).tolist()
        assert (entry["category_id"], entry["category_name"]) == (inst.label, inst.name)


def test_empty_proposals_and_a_zero_area_mask(tiny_backbone, sam, scene):
    seg = make(tiny_backbone, sam)
    seg.set_image(scene.image)
    for result in (seg.predict(masks=np.zeros((0, 48, 64), bool)), seg.predict(points=np.zeros((0, 2)))):
        assert result.instances == [] and result.to_coco(1) == []
        assert not result.labels.any() and not result.scores.any()
    empty = np.zeros((48, 64), bool)
    obj = scene.instance == 1
    result = seg.predict(masks=np.stack([empty, obj]))
    zero = result.instances[0]
    assert (zero.label, zero.name, zero.score, zero.area, zero.box) == (-1, "unknown", 0.0, 0, [0.0] * 4)
    assert not decode(zero.rle()).any()
    assert result.instances[1].label >= 0
    check_semantic_map(result)


def test_unknown_masks_paint_background(tiny_backbone, scene):
    masks = np.stack([scene.instance == i for i in (1, 2, 3)])
    result = make(tiny_backbone, unknown_threshold=1.0, logit_scale=1.0).segment(scene.image, masks=masks)
    assert [i.label for i in result.instances] == [-1, -1, -1]
    assert all(i.name == "unknown" and i.score > 0 for i in result.instances)
    assert not result.labels.any()


def test_usage_errors(tiny_backbone, scene):
    seg = make(tiny_backbone)
    with pytest.raises(OvdenseError, match="set_image"):
        seg.predict(masks=np.zeros((1, 48, 64), bool))
    seg.set_image(scene.image)
    with pytest.raises(OvdenseError, match="no SAM model"):
        seg.predict()
    with pytest.raises(OvdenseError, match=r"masks must be \[M, 48, 64\]"):
        seg.predict(masks=np.zeros((1, 32, 32), bool))
    with pytest.raises(OvdenseError, match="unknown method"):
        make(tiny_backbone, method="magic")
    with pytest.raises(OvdenseError, match="crop_area"):
        make(tiny_backbone, crop_area=2.0)


# --------------------------------------------------------------------------------------------
# Weights


def test_load_sam_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(OvdenseError, match=r"sam_vit_b_01ec64\.pth.*--sam-checkpoint"):
        load_sam(None)
    missing = tmp_path / "sam_vit_l_0b3195.pth"
    with pytest.raises(OvdenseError) as info:
        load_sam(missing)  # the type comes from the file name
    assert str(missing) in str(info.value) and "vit_l expects sam_vit_l_0b3195.pth" in str(info.value)
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth" in str(info.value)
    with pytest.raises(OvdenseError, match="cannot tell the SAM model type"):
        load_sam(tmp_path / "weights.pth")
    with pytest.raises(OvdenseError, match="unknown SAM model 'vit_x'"):
        load_sam(tmp_path / "weights.pth", "vit_x")
    (tmp_path / "weights.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # not installed
    with pytest.raises(OvdenseError, match=r"pip install 'ovdense\[sam\]'"):
        load_sam(tmp_path / "weights.pth", "vit_b")


def test_load_sam_is_strict_and_loads_the_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam())
    source = tiny_sam()
    for p in source.parameters():
        p.data.normal_()
    state = source.state_dict()
    good = tmp_path / "good_vit_b.pth"
    torch.save(state, good)
    loaded = load_sam(good)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key])
    broken = dict(state)
    broken["mask_decoder.extra.weight"] = broken.pop("mask_decoder.iou_token.weight")
    torch.save(broken, tmp_path / "broken_vit_b.pth")
    with pytest.raises(OvdenseError) as info:
        load_sam(tmp_path / "broken_vit_b.pth")
    message = str(info.value)
    assert "missing keys [mask_decoder.iou_token.weight]" in message
    assert "unexpected keys [mask_decoder.extra.weight]" in message and "vit_b" in message


# --------------------------------------------------------------------------------------------
# A trained CLIP on the synthetic world


def test_toy_clip_names_every_ground_truth_mask():
    """The toy CLIP, trained on the synthetic world, names every object's colour from its
    ground-truth mask given as the proposal. (Its pooled patch tokens know colours, not yet
    shapes: colour + shape names were right for about half the objects when this was written.)"""
    from ovdense import create_backbone
    from ovdense.backbone.clip import toy_files
    from ovdense.data.synthetic import colour_classes

    try:
        toy_files()
    except OvdenseError as e:
        pytest.skip(f"the toy CLIP's weights are not in ovdense/assets yet: {e}")
    backbone = create_backbone("toy")  # its own templates ("a photo of a {}") and short side
    seg = SamClipSegmenter(backbone, None, colour_classes(), method="vanilla")
    for seed in range(10):  # objects of the pixel size the toy model was trained at
        scene = render_scene(seed, SceneConfig(size=(128, 128), objects=(2, 3), radius=(0.12, 0.2)))
        masks = np.stack([scene.instance == i + 1 for i in range(len(scene.objects))])
        result = seg.segment(scene.image, masks=masks)
        assert [i.name for i in result.instances] == [o.colour for o in scene.objects], seed


# --------------------------------------------------------------------------------------------
# Command line


def test_cli_sam_clip_writes_labels_overlay_and_instances(tiny_config_path, scene, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam())
    checkpoint = tmp_path / "sam_vit_b_tiny.pth"
    torch.save(tiny_sam().state_dict(), checkpoint)
    image = tmp_path / "in" / "scene.png"
    image.parent.mkdir()
    Image.fromarray(scene.image).save(image)
    out = tmp_path / "out"
    base = ["segment", str(image), "--classes", "background,red|crimson,blue", "--model",
            str(tiny_config_path), "--pretrained", "none", "--templates", "single", "--short-side", "0",
            "--out", str(out), "--method", "sam-clip"]
    code = main(base + ["--sam-checkpoint", str(checkpoint), "--points-per-side", "2",
                        "--pred-iou-thresh", "0", "--stability-score-thresh", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    with Image.open(out / "scene_labels.png") as pil:
        labels = np.asarray(pil)
    entries = json.loads((out / "scene_instances.json").read_text())
    assert entries and {e["image_id"] for e in entries} == {"scene"}
    masks = np.stack([decode(e["segmentation"]) for e in entries])
    want, _ = overlap_rule(masks, [e["category_id"] for e in entries], [e["score"] for e in entries])
    np.testing.assert_array_equal(labels, want)
    with Image.open(out / "scene_overlay.jpg") as pil:
        assert pil.size[0] == 64 + 200 and pil.size[1] >= 48

    code = main(base + ["--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "sam_vit_b_01ec64.pth" in err and "--sam-checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    code = main(base[:-2] + ["--points-per-side", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "--points-per-side: not an option of --method clearclip" in err
    code = main(base + ["--sam-checkpoint", str(checkpoint), "--window", "32", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "--window: not an option of --method sam-clip" in err
