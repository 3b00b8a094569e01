"""F-ViT's plain-torch parts (ovdense/heads/detection.py) against independent computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense import create_backbone
from ovdense.backbone import dense
from ovdense.errors import OvdenseError
from ovdense.heads import detection as det


@pytest.fixture(scope="module")
def toy():
    return create_backbone("toy")


def test_out_indices_scale_with_depth():
    assert det.fvit_out_indices(12) == (3, 5, 7, 11)  # F-ViT B/16 config
    assert det.fvit_out_indices(24) == (6, 10, 14, 23)  # F-ViT L/14 config
    assert det.fvit_out_indices(6) == (1, 2, 3, 5)  # the toy
    with pytest.raises(OvdenseError):
        det.fvit_out_indices(1)


@pytest.mark.parametrize("model, size", [("ViT-B-16", (64, 96)), ("toy", (64, 96))])
def test_pyramid_shapes_and_strides(model, size, toy):
    torch.manual_seed(0)
    backbone = toy if model == "toy" else create_backbone(model)  # B/16: random weights, no download
    images = torch.randn(2, 3, *size)
    features = det.frozen_features(backbone, images)
    p = backbone.patch_size
    assert features.stride == p
    assert features.clip_map.shape == (2, backbone.embed_dim, size[0] // p, size[1] // p)
    pyramid = det.SimplePyramid(backbone.width)
    outputs = pyramid(features.levels)
    strides = det.SimplePyramid.strides(p)
    assert strides == ((4, 8, 16, 32) if p == 16 else (2, 4, 8, 16))
    for out, stride in zip(outputs, strides):
        assert out.shape == (2, backbone.width, size[0] // stride, size[1] // stride)
    # the frozen tower gives no gradient; the pyramid's parameters do get one
    assert not any(level.requires_grad for level in features.levels)
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in pyramid.parameters())
    assert all(q.grad is None for q in backbone.parameters())


def test_frozen_features_are_the_towers_own(toy):
    """At the native size (no position resizing) the taps equal the tower's intermediate maps and
    the CLIP map equals ``encode_dense`` of the method: two independent code paths."""
    images = torch.randn(2, 3, 64, 64)
    features = det.frozen_features(toy, images)
    reference = toy.forward_intermediates(images, [1, 2, 3])
    for got, want in zip(features.levels[:3], reference):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(features.clip_map, toy.encode_dense(images, "maskclip"), atol=1e-5, rtol=1e-5)
    # the last level is the value-path block's output, before ln_post / proj
    visual = toy.model.visual
    x = dense.embed(visual, images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    value = dense.maskclip_block(visual.transformer.resblocks[-1], x, (8, 8))[:, 1:]  # B, hw, W
    torch.testing.assert_close(features.levels[3], value.reshape(2, 8, 8, -1).permute(0, 3, 1, 2))
    sclip = det.frozen_features(toy, images, method="sclip")
    torch.testing.assert_close(sclip.clip_map, toy.encode_dense(images, "sclip"), atol=1e-5, rtol=1e-5)


def test_frozen_features_with_captured_maps(tiny_backbone):
    images = torch.randn(1, 3, 32, 32)
    features = det.frozen_features(tiny_backbone, images, method="itaclip")
    torch.testing.assert_close(features.clip_map, tiny_backbone.encode_dense(images, "itaclip"),
                               atol=1e-5, rtol=1e-5)


def _bilinear(v, y, x):
    """torchvision's roi_align bilinear sample of ``v [H, W]`` (its CPU kernel's rules)."""
    H, W = v.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * v[y0, x0] + (1 - ly) * lx * v[y0, x1]
            + ly * (1 - lx) * v[y1, x0] + ly * lx * v[y1, x1])


def _roi_align_1x1(features, box, scale):
    """Aligned 1×1 RoIAlign with adaptive sampling (``sampling_ratio=0``) in numpy: ``[C]``."""
    x1, y1, x2, y2 = (c * scale - 0.5 for c in box)
    gh, gw = math.ceil(y2 - y1), math.ceil(x2 - x1)
    out = np.zeros(features.shape[0])
    for iy in range(gh):
        for ix in range(gw):
            y = y1 + (iy + 0.5) * (y2 - y1) / gh
            x = x1 + (ix + 0.5) * (x2 - x1) / gw
            out += [_bilinear(channel, y, x) for channel in features]
    return out / max(gh * gw, 1)


def test_region_scores_and_ensemble_match_numpy():
    torch.manual_seed(0)
    C, D, stride, alpha, beta = 5, 8, 16, 0.1, 0.8
    clip_map = F.normalize(torch.randn(2, D, 6, 7, dtype=torch.float64), dim=1)
    rois = torch.tensor([[0, 3.0, 5.0, 60.0, 41.0], [1, 20.0, 0.0, 111.0, 95.0], [1, 50.2, 30.7, 58.9, 36.1]],
                        dtype=torch.float64)
    text = F.normalize(torch.randn(C, D, dtype=torch.float64), dim=-1)
    classifier = det.OpenVocabClassifier(D, background=torch.randn(D)).double()
    regions = torch.randn(3, D, dtype=torch.float64)
    seen = torch.tensor([True, False, True, True, False])

    got_clip = det.region_clip_embeddings(clip_map, rois, stride)
    columns = classifier.columns(text)
    det_prob = torch.softmax(classifier(regions, text), dim=-1)
    vlm = det.vlm_probabilities(got_clip, columns, 75.0)
    scores = det.ensemble(det_prob, vlm, seen, alpha, beta)

    maps, r, t = clip_map.numpy(), regions.numpy(), text.numpy()
    bg = classifier.background.detach().numpy()
    cols = np.concatenate([t, (bg / np.linalg.norm(bg))[None]])
    for i, roi in enumerate(rois.numpy()):
        emb = _roi_align_1x1(maps[int(roi[0])], roi[1:], 1 / stride)
        emb /= np.linalg.norm(emb)
        np.testing.assert_allclose(got_clip[i].numpy(), emb, atol=1e-10)
        d = 50.0 * cols @ (r[i] / np.linalg.norm(r[i]))
        d = np.exp(d - d.max()) / np.exp(d - d.max()).sum()
        v = 75.0 * cols @ emb
        v = np.exp(v - v.max()) / np.exp(v - v.max()).sum()
        for c in range(C + 1):
            a = alpha if c == C or seen[c] else beta  # background counts as seen
            np.testing.assert_allclose(scores[i, c].item(), d[c] ** (1 - a) * v[c] ** a, rtol=1e-9)


def test_vocabulary_permutation_permutes_scores():
    torch.manual_seed(0)
    C, D = 6, 16
    classifier = det.OpenVocabClassifier(D)
    text = F.normalize(torch.randn(C, D), dim=-1)
    regions, clip = torch.randn(4, D), F.normalize(torch.randn(4, D), dim=-1)
    seen = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])

    def scores(t, s):
        return det.ensemble(torch.softmax(classifier(regions, t), -1),
                            det.vlm_probabilities(clip, classifier.columns(t), 75.0), s, 0.1, 0.8)

    full, swapped = scores(text, seen), scores(text[perm], seen[perm])
    torch.testing.assert_close(swapped[:, :C], full[:, perm])
    torch.testing.assert_close(swapped[:, C], full[:, C])
    names = ["a", "b", "c"]
    assert det.seen_mask(["c", "x", "a"], names).tolist() == [True, False, True]


def test_masked_novel_classes_get_no_gradient():
    torch.manual_seed(0)
    C, D = 5, 8
    classifier = det.OpenVocabClassifier(D)
    text = F.normalize(torch.randn(C, D), dim=-1).requires_grad_()
    regions = torch.randn(7, D, requires_grad=True)
    base = torch.tensor([True, False, True, True, False])
    labels = torch.tensor([0, 2, 3, C, 0, C, 3])  # base classes and background only
    logits = classifier(regions, text, trainable=base)
    assert torch.isinf(logits[:, 1]).all() and torch.isinf(logits[:, 4]).all()
    F.cross_entropy(logits, labels).backward()
    assert text.grad[~base].abs().max() == 0
    assert (text.grad[base].abs().sum(dim=1) > 0).all()
    assert torch.isfinite(regions.grad).all() and regions.grad.abs().sum() > 0


def test_bad_inputs_one_error_each(tmp_path, toy, tiny_backbone):
    with pytest.raises(OvdenseError, match="empty"):
        det.check_vocabulary([])
    with pytest.raises(OvdenseError, match="twice"):
        det.check_vocabulary(["red circle", "red circle"])
    with pytest.raises(OvdenseError, match="empty"):
        det.OpenVocabClassifier(8).columns(torch.zeros(0, 8))
    head = det.SimplePyramid(toy.width)
    path = det.save_head(tmp_path / "head.safetensors", head.state_dict(), toy, {"classes": ["a"]})
    state, config = det.load_head(path, toy)
    assert config == {"classes": ["a"]} and set(state) == set(head.state_dict())
    with pytest.raises(OvdenseError, match="trained on backbone"):
        det.load_head(path, tiny_backbone)
    pickled = tmp_path / "head.pth"
    torch.save(head.state_dict(), pickled)
    with pytest.raises(OvdenseError, match="never unpickles"):
        det.load_head(pickled, toy)
    with pytest.raises(OvdenseError, match="not found"):
        det.load_head(tmp_path / "missing.safetensors", toy)
    with pytest.raises(OvdenseError, match="unknown method"):
        det.frozen_features(toy, torch.zeros(1, 3, 64, 64), method="nope")


def test_toy_clip_term_names_novel_boxes_above_chance(toy):
    """The test-time CLIP term on the shipped toy model: ground-truth boxes of held-out scenes,
    classified among all 30 pairs by 1×1 RoIAlign on the maskclip map, are named far above chance
    (1/30), novel pairs as well as base — what lets the ensemble find classes never trained on."""
    from ovdense.data import rle
    from ovdense.data.synthetic import SceneConfig, colour_shape_classes, open_vocabulary_split, render_scene

    names = colour_shape_classes()[1:]
    _, novel = open_vocabulary_split()
    templates = toy.defaults["templates"]
    text = toy.encode_text(names, templates)
    background = toy.encode_text(["background"], templates)[0]
    classifier = det.OpenVocabClassifier(toy.embed_dim, background=background)
    hits = {True: [], False: []}
    for seed in range(40):
        scene = render_scene(np.random.default_rng([5, seed]), SceneConfig(size=(128, 128)))
        features = det.frozen_features(toy, toy.to_tensor(scene.image))
        rois, labels = [], []
        for index, obj in enumerate(scene.objects, start=1):
            x, y, w, h = rle.bbox(scene.instance == index)
            rois.append([0, x, y, x + w, y + h])
            labels.append(names.index(f"{obj.colour} {obj.shape}"))
        regions = det.region_clip_embeddings(features.clip_map, torch.tensor(rois), features.stride)
        probabilities = det.vlm_probabilities(regions, classifier.columns(text), toy.logit_scale)
        for label, guess in zip(labels, probabilities[:, :-1].argmax(dim=1).tolist()):
            hits[names[label] in novel].append(label == guess)
    assert len(hits[True]) >= 20 and len(hits[False]) >= 20
    accuracy = {novel: float(np.mean(v)) for novel, v in hits.items()}
    assert accuracy[True] > 0.15 and accuracy[False] > 0.15, accuracy
