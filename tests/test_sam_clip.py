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
from tool_runs import tiny_sam  # noqa: E402

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
    ground-truth mask given as the proposal, with OVSeg's masked-crop blend (``crop_area=1.0``: each
    mask's pooled dense embedding blended with its masked crop's class token, λ = 0.5).

    Changed with the toy's second version: its patch tokens call the rims of objects background
    (docs/toy_world.md), so the dense features pooled alone (one pass, ``vanilla``) name 20 of these
    26 objects' colours (the first toy: all 26, the bar this test held); its class token names a
    cut-out object's colour every time, and with the blend all 26 are right again. Colour + shape
    pairs: 13 of 26 with the blend."""
    from ovdense import create_backbone
    from ovdense.backbone.clip import toy_files
    from ovdense.data.synthetic import colour_classes

    try:
        toy_files()
    except OvdenseError as e:
        pytest.skip(f"the toy CLIP's weights are not in ovdense/assets yet: {e}")
    backbone = create_backbone("toy")  # its own templates ("a photo of a {}") and short side
    seg = SamClipSegmenter(backbone, None, colour_classes(), method="vanilla", crop_area=1.0)
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


# --------------------------------------------------------------------------------------------
# Every SAM + CLIP flag of the command line: the proposals against segment-anything's own
# generator, the classes against a classification computed here


def small_sam():
    """A 128-px SAM (image encoder width 32, two windowed blocks; SAM's prompt encoder and mask
    decoder, the decoder's weights ×3 so that its random masks differ in area, predicted IoU and
    stability): its automatic masks take a fraction of a second (``tiny_sam`` encodes 1024 px)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    size, patch = 128, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=size, mlp_ratio=4, num_heads=2, patch_size=patch, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=(),
            window_size=8, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    with torch.no_grad():
        for p in sam.mask_decoder.parameters():
            p.mul_(3.0)
    return sam.eval()


CLI_CLASSES = "background,red|crimson,green,blue"
PROMPTS, CLASS_OF_PROMPT = ["background", "red", "crimson", "green", "blue"], [0, 1, 1, 2, 3]
# the options of every run below: 3 × 3 points, every mask kept (but by box NMS at IoU 0.95)
BASE_FLAGS = {"--points-per-side": "3", "--pred-iou-thresh": "0", "--stability-score-thresh": "0",
              "--box-nms-thresh": "0.95"}
BASE_OPTIONS = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                "box_nms_thresh": 0.95}


@pytest.fixture(scope="module")
def sam_cli(tmp_path_factory, scene):
    """``run(out, **flags)``: ``ovdense segment --method sam-clip --model toy`` on the scene with a
    ``small_sam`` checkpoint and ``BASE_FLAGS`` (``flags`` maps a flag to its value, replacing or
    adding): the instances (JSON) and the labels (PNG)."""
    folder = tmp_path_factory.mktemp("sam-cli")
    checkpoint = folder / "sam_vit_b_small.pth"
    torch.save(small_sam().state_dict(), checkpoint)
    image = folder / "scene.png"
    Image.fromarray(scene.image).save(image)

    def run(out, **flags):
        options = {"--sam-checkpoint": str(checkpoint), **BASE_FLAGS, **flags}
        argv = ["segment", str(image), "--classes", CLI_CLASSES, "--model", "toy", "--short-side", "0",
                "--method", "sam-clip", "--out", str(out)]
        argv += [str(v) for flag, value in options.items() for v in (flag, value)]
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OVDENSE_CACHE", str(folder / "cache"))
            patch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: small_sam())
            code = main(argv)
        assert code == 0
        with Image.open(out / "scene_labels.png") as pil:
            labels = np.asarray(pil)
        return json.loads((out / "scene_instances.json").read_text()), labels

    run.checkpoint = checkpoint
    return run


@pytest.fixture(scope="module")
def small():
    return small_sam()


def generated(sam, image, **options) -> np.ndarray:
    """segment-anything's ``SamAutomaticMaskGenerator.generate`` with ``BASE_OPTIONS`` and
    ``options``: its masks ``[M, H, W]``, in its order."""
    found = SamAutomaticMaskGenerator(sam, **{**BASE_OPTIONS, **options}).generate(image)
    return np.stack([a["segmentation"] for a in found]) if found else np.zeros((0, *image.shape[:2]), bool)


def masks_of(entries) -> np.ndarray:
    return np.stack([decode(e["segmentation"]) for e in entries])


PROPOSAL_CASES = {  # flag: (value, segment-anything's option)
    "--points-per-side": ("2", {"points_per_side": 2}),
    "--pred-iou-thresh": ("0.9", {"pred_iou_thresh": 0.9}),
    "--stability-score-thresh": ("0.9", {"stability_score_thresh": 0.9}),
    "--box-nms-thresh": ("0.9", {"box_nms_thresh": 0.9}),
    "--min-mask-region-area": ("10", {"min_mask_region_area": 10}),
}


@pytest.mark.parametrize("flag", PROPOSAL_CASES)
def test_cli_sam_proposal_flags(sam_cli, small, scene, tmp_path, flag):
    """Each SAM flag changes the proposals as segment-anything's generator with that option does:
    the instances' masks are its masks, in its order, which differ from the masks without the
    flag; the labels follow the overlap rule."""
    value, option = PROPOSAL_CASES[flag]
    entries, labels = sam_cli(tmp_path / "out", **{flag: value})
    want = generated(small, scene.image, **option)
    base = generated(small, scene.image)
    assert len(entries) == len(want) > 0
    np.testing.assert_array_equal(masks_of(entries), want)
    assert len(want) != len(base) or (want != base).any(), "the option changes nothing here"
    rule, _ = overlap_rule(want, [e["category_id"] for e in entries], [e["score"] for e in entries])
    np.testing.assert_array_equal(labels, rule)


def classified_here(backbone, rgb, masks, method="clearclip", crop_area=None, crop_weight=0.0):
    """Each mask's ``(label, score)`` computed here: the dense features of ``method`` (the image at
    its own size) averaged under the mask by ``pooled_by_loop``, L2-normalised; below ``crop_area``
    of the image blended ``(1 − λ)·pooled + λ·crop`` with the CLIP embedding of its masked crop (box,
    outside the mask at the mean colour, bicubic to the native size); ``softmax(logit scale ·
    cosine)`` over the prompts, a class's probability its best synonym's."""
    from ovdense.backbone.dense import METHODS

    text = backbone.encode_text(PROMPTS, backbone.defaults["templates"]).double()  # Q, D
    x = backbone.to_tensor(rgb)  # 1, 3, H, W
    with torch.no_grad():
        features = backbone.encode_dense(x, method)[0]  # D, h, w
    H, W = rgb.shape[:2]
    found = []
    for mask in masks:
        if not mask.any():
            found.append((-1, 0.0))
            continue
        embedding = pooled_by_loop(features, torch.from_numpy(mask))
        embedding = embedding / embedding.norm()
        if crop_area is not None and mask.sum() < crop_area * H * W:
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            region = x[0, :, y0:y1, x0:x1].float() * torch.from_numpy(mask[y0:y1, x0:x1])
            crop = F.interpolate(region[None], size=backbone.native_size, mode="bicubic", align_corners=False)
            with torch.no_grad():
                crop_embedding = backbone.encode_image(crop)[0].double()
            embedding = (1 - crop_weight) * embedding + crop_weight * crop_embedding / crop_embedding.norm()
            embedding = embedding / embedding.norm()
        probs = torch.softmax(METHODS[method].protocol.logit_scale * text @ embedding, dim=0)
        classes = [max(float(probs[q]) for q in range(len(PROMPTS)) if CLASS_OF_PROMPT[q] == c)
                   for c in range(max(CLASS_OF_PROMPT) + 1)]
        found.append((int(np.argmax(classes)), max(classes)))
    return found


def check_classes(entries, want):
    assert [e["category_id"] for e in entries] == [label for label, _ in want]
    np.testing.assert_allclose([e["score"] for e in entries], [score for _, score in want], atol=1e-5)


@pytest.fixture(scope="module")
def toy_clip():
    from ovdense import create_backbone

    return create_backbone("toy")


@pytest.fixture(scope="module")
def base_run(sam_cli, tmp_path_factory):
    return sam_cli(tmp_path_factory.mktemp("sam-base") / "out")


def test_cli_clip_method_and_sam_model(sam_cli, base_run, toy_clip, scene, tmp_path):
    """``--clip-method maskclip`` pools MaskCLIP's features with its logit scale (the default run:
    ClearCLIP's, and the two differ); ``--sam-model vit_b`` reads a checkpoint whose name does not
    say its type (the same masks as the default run's)."""
    unnamed = tmp_path / "weights.pth"
    unnamed.write_bytes(sam_cli.checkpoint.read_bytes())
    entries, _ = sam_cli(tmp_path / "out", **{"--clip-method": "maskclip", "--sam-model": "vit_b",
                                              "--sam-checkpoint": str(unnamed)})
    base, _ = base_run
    masks = masks_of(base)
    np.testing.assert_array_equal(masks_of(entries), masks)
    check_classes(base, classified_here(toy_clip, scene.image, masks))
    want = classified_here(toy_clip, scene.image, masks, method="maskclip")
    check_classes(entries, want)
    assert not np.allclose([e["score"] for e in base], [score for _, score in want], atol=1e-3)


def test_cli_unknown_threshold(sam_cli, base_run, tmp_path):
    """``--unknown-threshold T``: the masks scoring below T (in the run without it) are unknown
    (category -1, their pixels 0), the others keep their class; scores and masks are unchanged."""
    base, _ = base_run
    scores = sorted({e["score"] for e in base if e["score"] > 0})
    assert len(scores) >= 2, scores
    middle = len(scores) // 2
    threshold = (scores[middle - 1] + scores[middle]) / 2
    entries, labels = sam_cli(tmp_path / "out", **{"--unknown-threshold": threshold})
    want = [-1 if e["score"] < threshold else e["category_id"] for e in base]
    assert -1 in want and any(label >= 0 for label in want)
    assert [e["category_id"] for e in entries] == want
    assert [e["category_name"] == "unknown" for e in entries] == [label == -1 for label in want]
    np.testing.assert_allclose([e["score"] for e in entries], [e["score"] for e in base], atol=1e-7)
    masks = masks_of(entries)
    np.testing.assert_array_equal(masks, masks_of(base))
    rule, _ = overlap_rule(masks, want, [e["score"] for e in entries])
    np.testing.assert_array_equal(labels, rule)


def test_cli_crop_area_and_weight(sam_cli, base_run, toy_clip, scene, tmp_path):
    """``--crop-area 0.1 --crop-weight 0.7``: the masks under a tenth of the image take the blend
    of their pooled and their masked crop's embedding at λ = 0.7 (computed here), the others keep
    the scores of the run without the flags."""
    entries, _ = sam_cli(tmp_path / "out", **{"--crop-area": "0.1", "--crop-weight": "0.7"})
    base, _ = base_run
    masks = masks_of(entries)
    np.testing.assert_array_equal(masks, masks_of(base))
    small_masks = (masks.sum(axis=(1, 2)) < 0.1 * masks[0].size) & masks.any(axis=(1, 2))
    assert small_masks.any() and not small_masks.all(), masks.sum(axis=(1, 2))
    check_classes(entries, classified_here(toy_clip, scene.image, masks, crop_area=0.1, crop_weight=0.7))
    for entry, before, is_small in zip(entries, base, small_masks):
        if is_small:
            assert abs(entry["score"] - before["score"]) > 1e-4
        else:
            assert (entry["category_id"], entry["score"]) == (before["category_id"], before["score"])
