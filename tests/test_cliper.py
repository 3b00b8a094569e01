"""CLIPer (``ovdense.heads.cliper``) against the official linsun449/cliper.code run as is from its mirror:
``CLIPer.forward`` (``modified_clip/model.py``) for the class maps, with and without its sliding windows,
``CLIPer.preprocess`` and ``_resize`` for the input, ``CLIPer.classifier`` for the text, and
``Pipeline.forward`` (``ovs/pipeline.py``, no refinement) with ``main_ovs.py:46-49`` and ``cam_to_label``
(``util/miou.py``) for the labels. The official code imports OpenAI's ``clip`` package, read from its
mirror too.

Both sides share random weights: a small ViT-B/16-shaped CLIP with QuickGELU (OpenAI's activation),
built by open_clip, saved, and read by ``create_backbone`` (ovdense) and by OpenAI's ``clip.model.CLIP``
(the official side; the key names are the same). What is changed to run the official code here:
``clip.load`` returns that model instead of reading ``/home/sunlin/.cache/clip/ViT-B-16.pt``, and the
Stable Diffusion module (``diffusion_model.stable_diffusion``, only for the refinement, which is off)
and ``texttable`` (the mIoU table) are empty stand-ins. Everything runs in fp32 on the CPU, where the
official ``clip.load`` also gives fp32; the official fp16 rounding of the position embedding is kept.
The loaders live in tests/official_segmenters.py (the benchmark uses them too).
"""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pytest
import torch
from official_clim import mirror_checkout
from official_segmenters import (
    CLIPER_REPO,
    cliper_clip,
    cliper_config,
    cliper_labels,
    import_cliper,
    official_cliper,
)
from PIL import Image

from ovdense import create_backbone
from ovdense.backbone import runner
from ovdense.backbone.prompts import CAR_TEMPLATES, Vocabulary, imagenet80_templates
from ovdense.errors import OvdenseError
from ovdense.heads import cliper
from ovdense.heads.cliper import CliperSegmenter

#: a ViT-B/16-shaped CLIP, small: patch 16, native 224 (grid 14), twelve blocks, four heads, QuickGELU
CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
#: class 0 carries the background words; the rest is the foreground, one text per class
CLASSES = ["background, ground, sky", "red circle", "blue square, blue box", "green triangle"]
C = len(CLASSES) - 1
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random CLIP of ``CONFIG`` (open_clip) and the same weights in ovdense's backbone, read from a
    JSON config and a weights file."""
    import open_clip

    root = tmp_path_factory.mktemp("cliper-tiny")
    torch.manual_seed(0)
    model = open_clip.CLIP(**CONFIG).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # attention far from uniform; positions large enough that their rounding shows
        for name, p in model.visual.named_parameters():
            if name.endswith("in_proj_weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
            elif name in ("positional_embedding", "class_embedding"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    config, weights = root / "cliper-tiny.json", root / "cliper-tiny.pt"
    config.write_text(json.dumps(CONFIG))
    torch.save(model.state_dict(), weights)
    backbone = create_backbone(str(config), pretrained=str(weights), cache_dir=root / "cache")
    assert type(backbone.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    return types.SimpleNamespace(model=model, backbone=backbone)


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """The official modules and the tiny CLIP as OpenAI's ``clip.model.CLIP`` (the official side) beside
    ovdense's backbone; skips without the mirrors."""
    official = import_cliper(tmp_path_factory.mktemp("cliper-official"))
    theirs = cliper_clip(official, tiny.model)
    assert theirs.visual.transformer.resblocks[0].attn.num_heads == 4  # width 64, head width 16
    return types.SimpleNamespace(official=official, clip_model=theirs, backbone=tiny.backbone)


_cfg = cliper_config


def _official(setup, monkeypatch, cfg, build=None):
    """A fresh ``CLIPer`` (or ``build(cfg, "cpu")``, the ``Pipeline``) on a copy of the shared random CLIP."""
    return official_cliper(setup.official, setup.clip_model, cfg, monkeypatch, build)


def _ours(setup, cfg, **kwargs) -> CliperSegmenter:
    window = (cfg.sliding_crop_size, cliper.SLIDE_STRIDE) if cfg.sliding_crop_size else (0, 0)
    return CliperSegmenter(setup.backbone, CLASSES, templates="car", short_side=cfg.size, window=window,
                           logit_scale=cfg.logit_scale, select_layer=cfg.select_layer,
                           attention_threshold=cfg.attention_thr, **kwargs)


def _text(head: CliperSegmenter) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground and background rows the official ``forward`` takes."""
    return head.text[:C], head.text[C:-1]


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """Flat coloured rectangles on a flat ground with a little noise."""
    rng = np.random.default_rng(seed)
    rgb = np.broadcast_to(rng.integers(0, 256, 3), (height, width, 3)).astype(np.float64)
    for _ in range(6):
        y, x = rng.integers(0, height - 30), rng.integers(0, width - 30)
        rgb[y:y + rng.integers(30, 90), x:x + rng.integers(30, 110)] = rng.integers(0, 256, 3)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("image,cfg", [
    ((200, 260), _cfg(224)),                                        # 224 x 288: 14 x 18 patches
    ((200, 260), _cfg(224, crop=224)),                              # two 224² windows
    ((300, 420), _cfg(336, select_layer=-2, thr=0.1, scale=100)),   # 336 x 464: 21 x 29 patches
    ((300, 420), _cfg(336, crop=224)),                              # 2 x 4 windows of 224², stride 112
], ids=["224", "224-slide", "336-layer-2", "336-slide"])
def test_maps_are_the_official_forward(setup, monkeypatch, image, cfg):
    """``CliperSegmenter.maps`` on the official preprocessing's tensor: the official ``forward``'s ``seg``."""
    official = _official(setup, monkeypatch, cfg)
    ours = _ours(setup, cfg)
    x = official.preprocess(Image.fromarray(_scene(*image, seed=sum(image))))[None]  # 1, 3, H', W'
    with torch.no_grad():
        expected = official(x, *_text(ours))["seg"]  # C, h, w
    got = ours.maps(x)
    assert torch.isfinite(expected).all()
    assert got.shape == expected.shape == (C, x.shape[2] // 16, x.shape[3] // 16)
    assert (got - expected).abs().max() <= 1e-4
    assert expected.amax() > 0.5 and (expected.amax(dim=(1, 2)) - expected.amin(dim=(1, 2))).min() > 1e-2


def test_preprocessing_is_the_official_resize(setup, monkeypatch):
    """``resize`` is ``CLIPer._resize`` pixel for pixel (PIL bicubic to the rounded size; B/16 and L/14
    patch sizes, landscape, portrait, up and down), and ``prepare`` the official ``preprocess``."""
    resize = setup.official.model.CLIPer._resize
    cases = [((200, 260), 224, 16), ((375, 500), 336, 16), ((500, 333), 336, 16), ((281, 719), 336, 14),
             ((1024, 1024), 448, 14), ((97, 130), 336, 16)]
    for (height, width), size, patch in cases:
        rgb = _scene(height, width, seed=height)
        want = np.asarray(resize(types.SimpleNamespace(size=size, patch_size=patch), Image.fromarray(rgb)))
        got = cliper.resize(rgb, size, patch)
        assert got.shape == want.shape and np.array_equal(got, want)
    cfg = _cfg(336)
    official = _official(setup, monkeypatch, cfg)
    rgb = _scene(300, 420, seed=1)
    expected = official.preprocess(Image.fromarray(rgb))[None]
    assert torch.allclose(_ours(setup, cfg).prepare(rgb), expected, rtol=0, atol=1e-6)


def test_palette_and_transparent_images_are_converted_first(setup, monkeypatch):
    """Departure 3: ovdense converts an image to RGB (``load_image``: a palette expanded, alpha composited
    over white) before the official resize; the official code resizes the opened image first (a palette
    image by nearest neighbour, Pillow's rule for mode "P") and then drops alpha. For such images the
    inputs differ; ovdense's is the official preprocessing of the converted image."""
    from ovdense.io import load_image

    cfg = _cfg(224)
    official = _official(setup, monkeypatch, cfg)
    ours = _ours(setup, cfg)
    rgb = _scene(200, 260, seed=5)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[50:150, 60:200, 3] = 0  # a transparent hole
    for image in (Image.fromarray(rgb).quantize(16), Image.fromarray(rgba)):
        converted = load_image(image)
        got = ours.prepare(converted)
        assert (got - official.preprocess(image)[None]).abs().max() > 0.1
        expected = official.preprocess(Image.fromarray(converted))[None]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def scene_text(setup):
    """A scene and text rows that split it: the random text tower's words are nearly parallel, so one class
    would win everywhere; rows along the official last-layer features of five of the scene's patches (less
    their mean) let every class win somewhere: 3 foreground rows, 2 background rows."""
    rgb = _scene(200, 260, seed=8)
    with pytest.MonkeyPatch.context() as patch:
        official = _official(setup, patch, _cfg(224))
        x = official.preprocess(Image.fromarray(rgb))[None]
        with torch.no_grad():
            feats = official(x, *_text(_ours(setup, _cfg(224))))["img_part_features"][-1, 1:]  # hw, D
    rows = feats[[0, 100, 200, 60, 240]] - feats.mean(dim=0)
    return rgb, rows[:C], rows[C:]


@pytest.mark.parametrize("cfg", [
    _cfg(224, score_threshold=0.3, bkg_thre=0.3, is_normalize=False),           # ADE20K's (the defaults)
    _cfg(224, crop=224, thr=0.1, score_threshold=0.5, bkg_thre=0.6, is_normalize=True),  # VOC21's, sliding
    _cfg(224, score_threshold=0.0, bkg_thre=0.0, is_normalize=False),           # the (1 − max)² branch
], ids=["ade", "voc21-slide", "bg-map"])
def test_labels_are_the_official_post_processing(setup, monkeypatch, scene_text, cfg):
    """``predict`` from the RGB image: the official ``Pipeline`` (no refinement) on the official
    preprocessing, then ``main_ovs.py:46-49`` as written there, ``cam_to_label`` included, at the image's
    size."""
    rgb, fg, bg = scene_text
    pipe = _official(setup, monkeypatch, cfg, build=setup.official.pipeline.Pipeline)
    ours = _ours(setup, cfg, score_threshold=cfg.score_threshold, bg_threshold=cfg.bkg_thre,
                 normalize_maps=cfg.is_normalize)
    ours.text = torch.cat([fg, bg, fg.mean(dim=0, keepdim=True)])
    img = pipe.cliper.preprocess(Image.fromarray(rgb))[None]
    with torch.no_grad():
        arg_mask = cliper_labels(setup.official, pipe, img, fg, bg, rgb.shape[:2], cfg)
    result = ours.predict(rgb)
    assert result.labels.shape == (200, 260) and result.scores.shape == (200, 260)
    assert np.array_equal(result.labels, arg_mask[0].numpy())
    assert len(np.unique(result.labels)) >= 3
    assert result.classes == ("background", "red circle", "blue square", "green triangle")
    assert result.settings["background_words"] == ["ground", "sky"] and result.settings["refinement"] is None


def test_text_and_classes_are_the_officials(setup, monkeypatch, tmp_path):
    """The text rows are ``CLIPer.classifier``'s (OpenAI's tokenizer and text tower); an official class
    file read by ``Vocabulary.from_file`` gives the official background words and foreground texts
    (``voc_datasets.py``: the first line split at spaces and commas, the others verbatim); the template
    sets are the official files."""
    official = _official(setup, monkeypatch, _cfg(224))
    ours = _ours(setup, _cfg(224))
    assert ours.foreground_names == ["red circle", "blue square, blue box", "green triangle"]
    with torch.no_grad():
        fg = official.classifier(ours.foreground_names, list(CAR_TEMPLATES))
        bg = official.classifier(["ground", "sky"], list(CAR_TEMPLATES))
    torch.testing.assert_close(ours.text, torch.cat([fg, bg, fg.mean(0, keepdim=True)]), rtol=0, atol=1e-5)

    files = ("template", "data/voc/cls_voc21.txt", "data/ade/cls_ade20k.txt")
    tree = mirror_checkout(CLIPER_REPO, tmp_path, files, "OVDENSE_CLIPER_REPO")
    lines = {name: (tree / f"template/{name}_template.txt").read_text().splitlines()
             for name in ("car", "openai")}
    assert list(CAR_TEMPLATES) == [line.strip() for line in lines["car"]]
    assert list(imagenet80_templates()) == [line.strip() for line in lines["openai"]]
    ade = (tree / "data/ade/cls_ade20k.txt").read_text().splitlines()
    head = CliperSegmenter(setup.backbone, Vocabulary.from_file(tree / "data/ade/cls_ade20k.txt"),
                           templates=["{}"])
    assert head.background_words == ["background"] == re.split(r"[\s,]+", ade[0])
    assert head.foreground_names == ade[1:] and len(ade) == 151
    voc = (tree / "data/voc/cls_voc21.txt").read_text().splitlines()
    with pytest.raises(OvdenseError, match="class 0 is the background: name it 'background'.*got 'ground'"):
        CliperSegmenter(setup.backbone, Vocabulary.from_file(tree / "data/voc/cls_voc21.txt"))
    head = CliperSegmenter(setup.backbone, ["background, " + voc[0], *voc[1:]], templates=["{}"])
    assert head.background_words == re.split(r"[\s,]+", voc[0]) and len(head.background_words) == 25
    assert head.foreground_names == voc[1:] and "person with clothes, people, human" in voc


def test_defaults_are_the_official_ade20k_config(tmp_path):
    """``DEFAULTS`` are the active lines of the official ViT-B/16 ADE20K config."""
    import yaml

    tree = mirror_checkout(CLIPER_REPO, tmp_path, ("scripts/config/vit-b-16",), "OVDENSE_CLIPER_REPO")
    yaml_cfg = yaml.safe_load((tree / "scripts/config/vit-b-16/ovs_ade150.yaml").read_text())
    d = cliper.DEFAULTS
    assert yaml_cfg["semantic_templates"].endswith(f"{d.templates}_template.txt")
    keys = ("size", "sliding_crop_size", "logit_scale", "select_layer", "attention_thr", "score_threshold",
            "bkg_thre", "is_normalize")
    assert tuple(yaml_cfg[key] for key in keys) == (d.short_side, d.window[0], d.logit_scale, d.select_layer,
                                                    d.attention_threshold, d.score_threshold, d.bg_threshold,
                                                    d.normalize_maps)


def test_settings_name_every_setting(tiny):
    head = CliperSegmenter(tiny.backbone, CLASSES)
    assert head.settings() == {
        "method": "cliper", "templates": "car", "short_side": 336, "window": [0, 0], "logit_scale": 100.0,
        "select_layer": -1, "attention_threshold": 0.2, "score_threshold": 0.3, "bg_threshold": 0.3,
        "normalize_maps": False, "background_words": ["ground", "sky"], "refinement": None,
    }
    alone = CliperSegmenter(tiny.backbone, ["background", "cat"], templates=["{}"])
    assert alone.background_words == ["background"] and alone.foreground_names == ["cat"]


def test_the_toy_models_own_defaults_come_first(toy, tmp_path):
    """Templates, short side and window come from the backbone's config first (the toy's: one template,
    128 px, 64/32 windows), as for the other heads; a file path is read by ``load_image``."""
    head = CliperSegmenter(toy, ["background", "red circle", "blue square"])
    assert (head.templates, head.short_side, head.window) == (["a photo of a {}"], 128, (64, 32))
    path = tmp_path / "scene.png"
    Image.fromarray(_scene(90, 120, seed=2)).save(path)
    result = head.predict(path)
    assert result.labels.shape == (90, 120) and result.labels.max() <= 2
    assert result.settings["window"] == [64, 32] and result.to_json()["method"] == "cliper"


def test_mutations_are_caught(setup, monkeypatch):
    """The parity test can fail: one Sinkhorn step for every feature (instead of the official cumulative
    in-place steps), and the position embedding without its fp16 rounding (``runner.embed``'s bilinear
    rule as it is), each move the maps far beyond 1e-4."""
    cfg = _cfg(224)
    official = _official(setup, monkeypatch, cfg)
    ours = _ours(setup, cfg)
    x = official.preprocess(Image.fromarray(_scene(200, 260, seed=3)))[None]
    with torch.no_grad():
        expected = official(x, *_text(ours))["seg"]
    assert (ours.maps(x) - expected).abs().max() <= 1e-4

    real_step = cliper.sinkhorn_step
    first: list[torch.Tensor] = []

    def single_step(attn):  # σ(S) for every feature, not σ^(k+1)(S)
        if not first:
            first.append(real_step(attn))
        return first[0]

    with monkeypatch.context() as patch:
        patch.setattr(cliper, "sinkhorn_step", single_step)
        assert (ours.maps(x) - expected).abs().max() > 1e-3
    with monkeypatch.context() as patch:
        patch.setattr(cliper, "embed", lambda visual, images: runner.embed(visual, images, resize="bilinear"))
        assert (ours.maps(x) - expected).abs().max() > 1e-3


def test_a_uniform_attention_row_is_not_nan(setup, monkeypatch):
    """Departure 1: the official fused attention divides a row that is all at its column means (a uniform
    row) by 0: NaN. ovdense takes the symmetrised row instead; every other row is the official's."""
    official = _official(setup, monkeypatch, _cfg(224))
    block = official.model.visual.transformer.resblocks[-1]
    heads, N = block.attn.num_heads, 10
    x = torch.randn(N, 1, CONFIG["vision_cfg"]["width"], generator=torch.Generator().manual_seed(0))  # LND
    attn = torch.rand(1, heads, N, N, generator=torch.Generator().manual_seed(1))
    attn[:, 0] = 1.0  # head 0: uniform attention
    with torch.no_grad():
        _, theirs = official.custom_attn(block.attn, block.ln_1(x), attn_mask=attn.clone())  # heads, N, N
    ours = cliper.fuse_attention(cliper.sinkhorn_step(attn))[0]
    assert torch.isnan(theirs[0]).all() and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[0], torch.full((N, N), 1.0 / N))
    torch.testing.assert_close(ours[1:], theirs[1:], rtol=0, atol=1e-7)


def test_a_window_with_gaps_is_refused(setup, monkeypatch):
    """Departure 2: a crop smaller than the official 112-px stride leaves patches no window covers; the
    official maps are then NaN, ovdense refuses the window."""
    cfg = _cfg(224, crop=64)
    official = _official(setup, monkeypatch, cfg)
    x = official.preprocess(Image.fromarray(_scene(200, 260, seed=3)))[None]
    with torch.no_grad():
        assert torch.isnan(official(x, *_text(_ours(setup, _cfg(224))))["seg"]).all()
    with pytest.raises(OvdenseError, match="stride is larger than the crop"):
        CliperSegmenter(setup.backbone, CLASSES, window=(64, 112))


@pytest.mark.parametrize("kwargs,message", [
    (dict(classes=["background"]), "at least one class after it"),
    (dict(classes=["cat", "dog"]), "class 0 is the background: name it 'background'.*got 'cat'"),
    (dict(window=(200, 112)), "multiples of the patch size 16"),
    (dict(window=(224,)), "must be .crop, stride."),
    (dict(select_layer=12), r"select_layer must be an integer in \[-12, 11\]"),
    (dict(select_layer=1.5), "select_layer must be an integer"),
    (dict(attention_threshold=1.5), r"attention_threshold must lie in \[0, 1\]"),
    (dict(bg_threshold=-0.1), r"bg_threshold must lie in \[0, 1\]"),
    (dict(score_threshold=2), r"score_threshold must lie in \[0, 1\]"),
    (dict(logit_scale=0), "logit_scale must be positive"),
    (dict(short_side=-1), "short_side must be ≥ 0"),
    (dict(templates="nope"), "unknown template set"),
    (dict(classes=[]), "the class list is empty"),
])
def test_bad_settings_are_one_clear_error(tiny, kwargs, message):
    kwargs = {"classes": CLASSES, **kwargs}
    with pytest.raises(OvdenseError, match=message):
        CliperSegmenter(tiny.backbone, **kwargs)


def test_bad_images_are_one_clear_error(tiny):
    head = CliperSegmenter(tiny.backbone, CLASSES, templates=["{}"], short_side=0)
    with pytest.raises(OvdenseError, match="smaller than one 16-pixel patch"):
        head.predict(np.zeros((7, 300, 3), np.uint8))
    with pytest.raises(OvdenseError, match="one prepared image"):
        head.maps(torch.zeros(1, 3, 40, 48))
    result = head.predict(_scene(40, 70, seed=0))  # short side kept: 48 x 64 (patch-rounded), labels 40 x 70
    assert result.labels.shape == (40, 70) and result.scores.dtype == np.float32


def test_cli_cliper_is_the_segmenter(tiny, tmp_path, capsys, monkeypatch):
    """``ovdense segment --method cliper`` with every CLIPer flag writes ``CliperSegmenter``'s labels for
    the same settings, and records them in its JSON."""
    from tool_runs import run_cli

    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "scene.png"
    Image.fromarray(_scene(100, 140, seed=4)).save(image)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CONFIG))
    weights = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), weights)
    settings = dict(short_side=112, window=(0, 0), select_layer=-2, attention_threshold=0.3,
                    score_threshold=0.1, bg_threshold=0.5, logit_scale=50.0)
    written = {}
    for flag in ("--normalize-maps", "--no-normalize-maps"):
        out = tmp_path / flag
        argv = ["segment", image, "--model", config, "--pretrained", weights, "--method", "cliper",
                "--classes", "background|ground|sky,red circle,blue square", "--templates", "car",
                "--short-side", "112", "--select-layer", "-2", "--attention-threshold", "0.3",
                "--score-threshold", "0.1", "--bg-threshold", "0.5", "--logit-scale", "50", flag,
                "--out", out]
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
        labels = np.asarray(Image.open(out / "scene_labels.png"))
        on = flag == "--normalize-maps"
        expected = CliperSegmenter(tiny.backbone, ["background, ground, sky", "red circle", "blue square"],
                                   templates="car", normalize_maps=on, **settings).predict(image)
        assert np.array_equal(labels, expected.labels)
        report = json.loads((out / "scene.json").read_text())
        assert report["settings"]["normalize_maps"] is on and report["settings"]["select_layer"] == -2
        written[flag] = labels
    # min-max normalised maps fall below the background threshold in places; the maps scaled to their
    # peak score do not, on this random text tower
    assert len(np.unique(written["--normalize-maps"])) == 3
    assert not np.array_equal(written["--normalize-maps"], written["--no-normalize-maps"])
