"""The Segmenter's inference protocol: resize rule, windows, classification, method extras."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from scipy import ndimage

from ovdense import Segmenter
from ovdense.backbone.dense import embed
from ovdense.errors import OvdenseError
from ovdense.heads.training_free import close_labels, rescale_size, window_boxes
from ovdense.refine.cluster import cluster_vote
from ovdense.refine.pamr import pamr


def make_segmenter(backbone, classes=("sky", "grass", "cow"), **kwargs):
    kwargs.setdefault("templates", "single")
    return Segmenter(backbone, kwargs.pop("method", "sclip"), list(classes), **kwargs)


def test_rescale_size_follows_mmcv_rule():
    assert rescale_size(375, 500, 336) == (336, 448)  # short side to 336
    assert rescale_size(500, 375, 448) == (597, 448)  # round half up: 597.33
    assert rescale_size(100, 4000, 336) == (51, 2048)  # long side capped at 2048


def test_window_boxes_cover_the_image_like_mmseg():
    boxes = window_boxes(336, 448, 224, 112)
    assert boxes == [(0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448),
                     (112, 336, 0, 224), (112, 336, 112, 336), (112, 336, 224, 448)]
    count = np.zeros((300, 500), int)
    for y1, y2, x1, x2 in window_boxes(300, 500, 224, 112):
        assert (y2 - y1, x2 - x1) == (224, 224)
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    assert window_boxes(100, 150, 224, 112) == [(0, 100, 0, 150)]  # crop larger than image


def test_one_window_covering_the_image_equals_one_pass(tiny_backbone, rng):
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    whole = make_segmenter(tiny_backbone, short_side=0, window=(0, 0))
    slid = make_segmenter(tiny_backbone, short_side=0, window=(64, 32))
    x = whole.prepare(rgb)
    torch.testing.assert_close(whole.logits(x, (48, 64)), slid.logits(x, (48, 64)))


@pytest.mark.parametrize("batch_windows", [16, 2, 1])  # 3 windows: one batch, 2 + 1, 1 + 1 + 1
def test_sliding_canvas_is_mean_of_window_logits(tiny_backbone, rng, batch_windows):
    seg = make_segmenter(tiny_backbone, short_side=0, window=(32, 16), kernel="reference",
                         batch_windows=batch_windows)
    whole = make_segmenter(tiny_backbone, short_side=0, window=(0, 0), kernel="reference")
    x = seg.prepare((rng.random((32, 64, 3)) * 255).astype(np.uint8))  # 3 windows along W
    with torch.no_grad():
        win = [whole.logits(x[..., a:a + 32], (32, 32)) for a in (0, 16, 32)]
        got = seg.logits(x, (32, 64))
    want = torch.zeros_like(got)
    want[:, :, :16] = win[0][:, :, :16]
    want[:, :, 16:32] = (win[0][:, :, 16:] + win[1][:, :, :16]) / 2
    want[:, :, 32:48] = (win[1][:, :, 16:] + win[2][:, :, :16]) / 2
    want[:, :, 48:] = win[2][:, :, 16:]
    torch.testing.assert_close(got, want)


def test_window_not_a_patch_multiple_is_padded_centred(tiny_backbone, rng):
    seg = make_segmenter(tiny_backbone, short_side=0, window=(0, 0))
    x = torch.randn(1, 3, 21, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = seg.logits(x, (21, 30))
        padded = F.pad(x, (1, 1, 1, 2))  # 21 → 24 (top 1, bottom 2), 30 → 32 (1, 1)
        feats = tiny_backbone.encode_dense(padded, "sclip")
        logits = torch.einsum("bdhw,qd->bqhw", feats, seg.text)
        want = F.interpolate(logits, size=(24, 32), mode="bilinear")[0, :, 1:22, 1:31]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method, kwargs", [
    ("clearclip", {"window": (32, 16), "bg_threshold": 0.4}),
    ("sclip", {"window": (24, 16)}),  # windows not a patch multiple: padded
    ("itaclip", {"window": (32, 24), "pamr": False}),  # image engineering on
    ("cliptrase", {}),
])
def test_streamed_prediction_equals_the_reference_path(tiny_backbone, rng, method, kwargs):
    rgb = (rng.random((37, 58, 3)) * 255).astype(np.uint8)
    fast = make_segmenter(tiny_backbone, method=method, short_side=40, **kwargs)
    slow = make_segmenter(tiny_backbone, method=method, short_side=40, kernel="reference", **kwargs)
    assert fast.streams and not slow.streams
    a, b = fast.predict(rgb), slow.predict(rgb)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_classify_softmax_synonym_max_and_background(tiny_backbone):
    seg = make_segmenter(tiny_backbone, classes=["background", "person, man, woman", "dog"],
                         logit_scale=10.0, bg_threshold=0.3)
    logits = torch.tensor([  # Q=5 prompts × 4 pixels
        [0.0, 0.5, 0.20, 0.00],
        [0.0, 0.0, 0.20, 0.30],
        [0.5, 0.0, 0.20, 0.30],
        [0.0, 0.0, 0.20, 0.30],
        [0.0, 0.2, 0.25, 0.35],
    ]).view(5, 1, 4)
    labels, scores = seg.classify(logits)
    e = np.exp(10 * logits.numpy()[:, 0].astype(np.float64))
    probs = e / e.sum(0)
    class_probs = np.stack([probs[0], probs[1:4].max(0), probs[4]])
    np.testing.assert_allclose(scores[0].numpy(), class_probs.max(0), rtol=1e-5)
    want = np.where(class_probs.max(0) < 0.3, 0, class_probs.argmax(0))
    np.testing.assert_array_equal(labels[0].numpy(), want)
    # a synonym wins pixel 0; bg wins pixel 1; pixel 2's best (dog) is below the threshold;
    # in pixel 3 dog beats each synonym of person though their sum would beat dog
    assert want.tolist() == [1, 0, 0, 2]


def test_area_threshold_drops_small_classes(tiny_backbone):
    seg = make_segmenter(tiny_backbone, classes=["bg", "a", "b"], logit_scale=100.0,
                         area_threshold=0.1)
    logits = torch.zeros(3, 1, 20)
    logits[1, 0, :19] = 1.0  # class a wins 19 pixels
    logits[2, 0, 19] = 1.0  # class b wins 1 pixel: 1/20 ≤ 0.1 → dropped
    labels, _ = seg.classify(logits)
    assert labels[0, :19].eq(1).all()
    assert labels[0, 19].item() == 0  # b's probability zeroed, the next best is bg (=a's 0)


def test_predict_result_has_the_image_size(tiny_backbone, rng):
    rgb = (rng.random((45, 70, 3)) * 255).astype(np.uint8)
    for method in ("clearclip", "naclip", "itaclip", "cliptrase"):
        seg = make_segmenter(tiny_backbone, method=method, short_side=40, window=(32, 16))
        result = seg.predict(rgb)
        assert result.labels.shape == result.scores.shape == (45, 70)
        assert result.labels.max() < 3 and abs(sum(result.class_shares()) - 1) < 1e-9


@pytest.mark.parametrize("weight", [None, 0.3])  # None: ITACLIP's img_eng_coefficient 0.75
def test_image_engineering_is_itaclip_mix(tiny_backbone, weight):
    options = {} if weight is None else {"image_engineering_weight": weight}
    seg = make_segmenter(tiny_backbone, method="itaclip", short_side=0, window=(0, 0),
                         image_engineering=True, pamr=False, **options)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = seg.logits(x, (32, 32))

        def up(t):
            return F.interpolate(t, size=(32, 32), mode="bilinear")[0]

        def feats(img):
            return tiny_backbone.encode_dense(img, "itaclip")

        variants = [x, TF.rgb_to_grayscale(x).repeat(1, 3, 1, 1), TF.gaussian_blur(x, 11, 5.0)]
        mean_feats = sum(feats(v) for v in variants) / 3
        main = up(torch.einsum("bdhw,qd->bqhw", mean_feats, seg.text))
        flips = [up(torch.einsum("bdhw,qd->bqhw", feats(x.flip(d)), seg.text)[None][0]).flip(d - 1)
                 for d in (2, 3)]
        w = 0.75 if weight is None else weight
        want = w * main + (1 - w) * (flips[0] + flips[1]) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_definitions_mix_into_the_defined_class_only(tiny_backbone):
    plain = make_segmenter(tiny_backbone, classes=["bg", "cat, kitty", "dog"])
    seg = make_segmenter(tiny_backbone, classes=["bg", "cat, kitty", "dog"],
                         definitions={"cat": "a small furry pet"}, definition_weight=0.3)
    described = tiny_backbone.encode_text(["a small furry pet"], "single")[0]
    torch.testing.assert_close(seg.text[[0, 3]], plain.text[[0, 3]])
    torch.testing.assert_close(seg.text[1:3], 0.7 * plain.text[1:3] + 0.3 * described)
    with pytest.raises(OvdenseError, match="unknown classes"):
        make_segmenter(tiny_backbone, definitions={"horse": "x"})


def test_close_labels_is_grey_closing(rng):
    labels = rng.integers(0, 4, size=(20, 30))
    want = ndimage.grey_closing(labels, size=(3, 3), mode="nearest")
    np.testing.assert_array_equal(close_labels(torch.from_numpy(labels)).numpy(), want)


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": []}, "empty"),
    ({"method": "nope"}, "unknown method"),
    ({"window": (224, 0)}, "window"),
    ({"window": (10, 20)}, "stride is larger than the crop"),
    ({"bg_threshold": 1.5}, "bg_threshold"),
    ({"short_side": -1}, "short_side"),
])
def test_bad_settings_raise_clear_errors(tiny_backbone, kwargs, message):
    with pytest.raises(OvdenseError, match=message):
        make_segmenter(tiny_backbone, **kwargs)


# --------------------------------------------------------------------------------------------
# PAMR, the cluster vote and method options inside the Segmenter, against direct computations


def test_segmenter_pamr_is_official_pamr_on_the_resized_logits(tiny_backbone, rng):
    """``pamr=True``: the official ``PAMR(10, dilations=(8, 16))`` (SCLIP/NACLIP/ClearCLIP/ITACLIP
    ``pamr_steps``, ``pamr_stride``) on the logits resized to the image, guided by the
    normalised image resized bilinearly to the same size (SCLIP ``forward_slide``)."""
    rgb = (rng.random((45, 60, 3)) * 255).astype(np.uint8)
    refined = make_segmenter(tiny_backbone, method="naclip", short_side=40, window=(32, 16), pamr=True)
    plain = make_segmenter(tiny_backbone, method="naclip", short_side=40, window=(32, 16), pamr=False)
    x = plain.prepare(rgb)  # 1, 3, 40, 53
    with torch.no_grad():
        logits = plain.logits(x, (45, 60))[None]  # 1, Q, 45, 60
        guide = F.interpolate(x, size=(45, 60), mode="bilinear", align_corners=False)
        want = pamr(guide, logits, dilations=(8, 16), num_iter=10)[0]
        got = refined.logits(x, (45, 60))
    assert not torch.allclose(want, logits[0], atol=1e-3)  # PAMR visibly changes these logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _cliptrase_affinity_by_hand(visual, x):
    """CLIPtrase's ``attn_weights[-2]``: at the input of block 11 of 12, the head mean of
    ``(cos(q_i, q_j) + cos(k_i, k_j) + cos(v_i, v_j)) / 3``, ``[N, N]``."""
    tokens = embed(visual, x)  # 1, N, W
    blocks = visual.transformer.resblocks
    assert len(blocks) == 12
    for block in blocks[:10]:
        tokens = block(tokens)
    block = blocks[10]
    y = F.linear(block.ln_1(tokens), block.attn.in_proj_weight, block.attn.in_proj_bias)  # 1, N, 3W
    heads = block.attn.num_heads
    total = 0
    for t in y.chunk(3, dim=-1):  # q, k, v: 1, N, W
        t = F.normalize(t.reshape(1, t.shape[1], heads, -1).transpose(1, 2), dim=-1)  # 1, heads, N, hd
        total = total + t @ t.transpose(-2, -1)
    return (total / 3).mean(dim=1)[0]


@pytest.mark.parametrize("cluster_params", [None, (0.5, 3)])
def test_segmenter_cluster_vote_is_cliptrase_on_the_padded_image(tiny_backbone, cluster_params):
    """The vote's wiring: block-11 affinity of the padded prepared image minus the class token's
    row, clamped at 0 (``clip_self_correlation.py``); DBSCAN ``cluster_params`` (``None``: the
    official 224 px pair (0.7, 3), nearest to 5×7 patches); the cluster maps cover the padded
    image, so the labels (twice the prepared size) sit at twice the padding offset."""
    g = np.random.default_rng(0)
    rgb = (g.random((66, 98, 3)) * 255).astype(np.uint8)
    seg = make_segmenter(tiny_backbone, method="cliptrase", classes=["a", "b", "c", "d", "e"],
                         short_side=33, cluster=True, cluster_params=cluster_params)
    # by hand: 66×98 → 33×49, normalised, zero-padded centred to 40×56 (3 top/left, 4 bottom/right)
    small = cv2.resize(rgb, (49, 33), interpolation=cv2.INTER_LINEAR)
    mean = torch.tensor(tiny_backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_backbone.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255 - mean) / std
    with torch.no_grad():
        affinity = _cliptrase_affinity_by_hand(tiny_backbone.model.visual, F.pad(x, (3, 4, 3, 4)))
    denoised = (affinity[1:, 1:] - affinity[0:1, 1:]).clamp(min=0)  # 35, 35
    eps, min_samples = cluster_params or (0.7, 3)
    # labels with structure (random classes on 12-pixel cells) so that every wiring mistake shows
    cells = torch.randint(0, 5, (6, 9), generator=torch.Generator().manual_seed(0))
    labels = cells.repeat_interleave(12, 0).repeat_interleave(12, 1)[:66, :98]
    want = cluster_vote(denoised, (5, 7), labels, eps, min_samples, canvas=(80, 112, 6, 6))
    got = seg._cluster_vote(seg.prepare(rgb), labels)
    assert (want != labels).float().mean() > 0.3  # the vote changes many labels here
    torch.testing.assert_close(got, want)
    # predict votes on the labels it would give without the vote
    plain = make_segmenter(tiny_backbone, method="cliptrase", classes=["a", "b", "c", "d", "e"],
                           short_side=33, cluster=False).predict(rgb).labels
    want = cluster_vote(denoised, (5, 7), torch.from_numpy(plain), eps, min_samples, canvas=(80, 112, 6, 6))
    assert (want.numpy() != plain).mean() > 0.1
    np.testing.assert_array_equal(seg.predict(rgb).labels, want.numpy())


def test_method_options_reach_the_last_block(tiny_backbone):
    """``method_options={"keep_residual": False}`` gives MaskCLIP's value path without residual
    and FFN (ClearCLIP's ablation), computed here from open_clip's own modules at the native
    32 px: ``ln_post(out_proj(W_v ln_1(x) + b_v)) @ proj``, cosine with the text, upsampled."""
    seg = make_segmenter(tiny_backbone, method="maskclip", short_side=0, window=(0, 0),
                         method_options={"keep_residual": False})
    default = make_segmenter(tiny_backbone, method="maskclip", short_side=0, window=(0, 0))
    visual = tiny_backbone.model.visual
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = visual._embeds(x)  # 1, 17, W: open_clip's conv1, class token, positions, ln_pre
        for block in visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        last = visual.transformer.resblocks[-1]
        width = tokens.shape[-1]
        w_v, b_v = last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:]
        v = F.linear(last.ln_1(tokens), w_v, b_v)  # 1, 17, W: the value path
        feats = visual.ln_post(last.attn.out_proj(v)) @ visual.proj  # 1, 17, D
        feats = F.normalize(feats[0, 1:], dim=-1)  # 16, D
        logits = (feats @ seg.text.T).T.reshape(1, -1, 4, 4)  # 1, Q, 4, 4
        want = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)[0]
        got = seg.logits(x, (32, 32))
        assert not torch.allclose(default.logits(x, (32, 32)), want, atol=1e-3)  # the option matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
