"""ProxyCLIP (``dense.proxyclip_block``, ``Segmenter(..., vfm=...)``) against the official
mc-lan/ProxyCLIP ``ProxyCLIPSegmentation`` run as is from its mirror: its bundled open_clip fork with
the custom last attention, its sliding windows padded to 56, its un-/re-normalisation for the VFM, its
softmax over synonyms and ``prob_thd``. Both sides share random weights: a small ViT-B/16-shaped CLIP
(the fork's ``create_model`` builds it from the same config; ovdense loads the fork's state dict) and
the official DINO ViT-B/8 (or DINOv2 ViT-B/14 with registers) that ``torch.hub.load`` would have built,
saved in the official layout and read by ``create_vfm``.

What is changed to run it here: ``create_model`` returns that model (no download), ``torch.hub.load``
returns the official hub models (no network), and ``.half()`` is a no-op during the official run, so
both run in fp32 on the CPU (the official code hard-codes fp16, which the CPU cannot multiply).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from official_vfm import (
    import_official_dino,
    import_official_dinov2,
    import_proxyclip,
    official_dinov2_vitb14_reg,
    spread,
)

from ovdense.backbone import dense
from ovdense.backbone.vfm import VFMS, create_vfm
from ovdense.errors import OvdenseError
from ovdense.heads.training_free import Segmenter

#: a ViT-B/16-shaped CLIP, small: patch 16, native 224 (grid 14), three blocks, four heads
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
#: the official class file's format: one class per line, synonyms after "; "
CLASSES = ["background; sky", "red circle", "blue square; blue box", "green triangle"]


@pytest.fixture(scope="module")
def proxyclip(tmp_path_factory):
    """The official segmentor module, its open_clip fork, a random CLIP of ``CONFIG`` in the fork and
    the same weights in ovdense, and the official DINO and DINOv2 hub models with their files."""
    root = tmp_path_factory.mktemp("proxyclip")
    module, fork = import_proxyclip(root / "repo")
    dino = import_official_dino(root / "dino")
    dinov2 = import_official_dinov2(root / "dinov2")
    config = root / "proxytiny.json"
    config.write_text(json.dumps(CONFIG))
    fork.add_model_config(config)
    torch.manual_seed(0)
    clip = fork.create_model("proxytiny", pretrained=None, precision="fp32").eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in clip.visual.named_parameters():
            if name.endswith("in_proj_weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            elif name in ("positional_embedding", "class_embedding"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    weights = root / "proxytiny.pt"
    torch.save(clip.state_dict(), weights)
    from ovdense import create_backbone

    backbone = create_backbone(str(config), pretrained=str(weights), cache_dir=root / "cache")
    hub = {"dino_vitb8": dino.vit_base(patch_size=8, num_classes=0).eval(),
           "dinov2_vitb14_reg": official_dinov2_vitb14_reg(dinov2)}
    files = {}
    for seed, (name, model) in enumerate(hub.items()):
        _structured(model, seed=10 + seed)
        files[name] = root / VFMS[name].weights_file
        torch.save(model.state_dict(), files[name])
    names = root / "cls_test.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    return dict(module=module, clip=clip, backbone=backbone, hub=hub, files=files, names=names, config=config,
                weights=weights)


def _structured(vfm: torch.nn.Module, seed: int) -> None:
    """Random weights whose features follow the image: blocks near identity, small positions, no
    patch bias. (Fully random blocks make every patch's feature nearly the same or nearly orthogonal
    to all others: the proxy attention is then the identity whatever the image, and would hide a
    wrong VFM input.) On ``_scene`` images 4–50 % of the pairs pass the β threshold."""
    spread(vfm, seed=seed)
    with torch.no_grad():
        for name, p in vfm.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                p.mul_(0.2)
            elif name == "pos_embed":
                p.mul_(0.3)
            elif name == "patch_embed.proj.bias":
                p.zero_()


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """Flat coloured rectangles on a flat ground with a little noise: regions the VFM can group."""
    rng = np.random.default_rng(seed)
    rgb = np.broadcast_to(rng.integers(0, 256, 3), (height, width, 3)).astype(np.float64)
    for _ in range(6):
        y, x = rng.integers(0, height - 30), rng.integers(0, width - 30)
        rgb[y:y + rng.integers(30, 90), x:x + rng.integers(30, 110)] = rng.integers(0, 256, 3)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def _official(proxyclip, monkeypatch, vfm: str, crop: int, stride: int, prob_thd: float = 0.0):
    """``ProxyCLIPSegmentation`` as its configs build it (``vfm_model`` ``"dino"`` / ``"dinov2"``)."""
    module = proxyclip["module"]
    monkeypatch.setattr(module, "create_model", lambda *args, **kwargs: proxyclip["clip"])
    monkeypatch.setattr(torch.hub, "load", lambda repo, name, *a, **k: proxyclip["hub"][name])
    monkeypatch.setattr(torch.Tensor, "half", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "half", lambda self: self)
    return module.ProxyCLIPSegmentation(
        clip_type="openai", model_type="ViT-B/16", vfm_model=vfm.split("_")[0],
        name_path=str(proxyclip["names"]), device=torch.device("cpu"), prob_thd=prob_thd, logit_scale=40,
        slide_stride=stride, slide_crop=crop)


def _ours(proxyclip, vfm: str, short_side: int, crop: int, stride: int, **kwargs) -> Segmenter:
    model = create_vfm(vfm, proxyclip["files"][vfm])
    classes = [line.replace("; ", ", ") for line in CLASSES]
    return Segmenter(proxyclip["backbone"], "proxyclip", classes, templates="imagenet80",
                     short_side=short_side, window=(crop, stride), vfm=model, **kwargs)


@pytest.mark.parametrize("vfm,size,short_side,crop,stride", [
    ("dino_vitb8", (260, 300), 336, 336, 112),   # the official defaults: two 336² windows, no padding
    ("dino_vitb8", (180, 250), 224, 200, 100),   # six 200² windows, each padded to 224² (56 × 4)
    ("dinov2_vitb14_reg", (180, 250), 224, 200, 100),
])
def test_logits_and_labels_are_the_official_segmentors(proxyclip, monkeypatch, vfm, size, short_side, crop,
                                                       stride):
    """The official ``forward_slide`` logits (cosine, before the scale, at the original size) and
    ``postprocess_result`` labels (softmax × 40 over every synonym, the max per class, ``prob_thd``) on
    ovdense's prepared image, against ``Segmenter.logits`` and ``Segmenter.predict``."""
    official = _official(proxyclip, monkeypatch, vfm, crop, stride, prob_thd=0.3)
    ours = _ours(proxyclip, vfm, short_side, crop, stride, bg_threshold=0.3)
    rgb = _scene(*size, seed=sum(size))
    x = ours.prepare(rgb)
    with torch.no_grad():
        expected = official.forward_slide(x, [dict(ori_shape=size)], stride, crop)[0]  # Q, H, W
        labels = official.postprocess_result(expected[None], None)[0]  # H, W
    got = ours.logits(x, size)
    assert got.shape == expected.shape == (6, *size)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() < 1e-4
    result = ours.predict(rgb)
    assert np.array_equal(result.labels, labels.numpy())
    assert len(np.unique(result.labels)) > 1


def test_the_vfm_and_beta_set_the_attention(proxyclip):
    """The test above can fail: the VFM's features shape the logits (the same DINO with one block's
    weights changed gives others), and so does β (method option ``beta``)."""
    ours = _ours(proxyclip, "dino_vitb8", 224, 224, 224)
    x = ours.prepare(_scene(224, 224, seed=3))
    base = ours.logits(x, (224, 224))
    ours.method_options = {"beta": 0.8}
    assert (ours.logits(x, (224, 224)) - base).abs().max() > 1e-3
    ours.method_options = {}
    with torch.no_grad():
        ours.vfm.model.blocks[-1].attn.proj.weight.mul_(3.0)
    assert (ours.logits(x, (224, 224)) - base).abs().max() > 1e-3
    assert ours.settings()["vfm"] == {"name": "dino_vitb8", "weights": str(proxyclip["files"]["dino_vitb8"])}


def test_a_window_of_alike_features_is_not_nan(proxyclip):
    """The one departure: every patch's own similarity is 1, so when the window's mean similarity
    exceeds 1/β every entry is below β·mean; the official code sets the whole map to −∞ and outputs NaN
    for the window. ovdense lets each patch attend to the patches most similar to it (itself and any
    exact copies) instead."""
    clip = proxyclip["clip"]
    block = clip.visual.transformer.resblocks[-1]
    features = torch.ones(1, 8, 3, 3)
    features[0, :, 0, 0] = torch.tensor([1.0, 0.9, 0, 0, 0, 0, 0, 0])  # one patch a little apart
    x = torch.randn(10, 1, 64, generator=torch.Generator().manual_seed(0))  # LND, 1 + 3 × 3 tokens
    with torch.no_grad():
        official = clip.visual.custom_attn(block.attn, block.ln_1(x), ex_feats=features, token_size=(3, 3))
        ours = dense.proxyclip_block(block, x.transpose(0, 1), (3, 3), vfm_features=features).tokens
    assert torch.isnan(official).all()
    weights = dense.proxy_attention(features)[0]  # 9, 9
    assert torch.isfinite(ours).all()
    assert torch.equal(weights[0], torch.eye(9)[0])  # the odd patch: itself only
    assert torch.allclose(weights[1:, 1:], torch.full((8, 8), 1 / 8)) and (weights[1:, 0] == 0).all()


def test_vfm_errors(proxyclip):
    backbone = proxyclip["backbone"]
    with pytest.raises(OvdenseError, match="proxyclip needs a second vision model: vfm=create_vfm"):
        Segmenter(backbone, "proxyclip", ["a"])
    with pytest.raises(OvdenseError, match="clearclip uses no second vision model"):
        Segmenter(backbone, "clearclip", ["a"], vfm=create_vfm("dino_vitb16", "random"))
    with pytest.raises(OvdenseError, match="vfm must be a vision model"):
        Segmenter(backbone, "proxyclip", ["a"], vfm="dino_vitb8")
    with pytest.raises(OvdenseError, match="keeps no class token"):
        dense.encode_tokens(backbone.model.visual, torch.zeros(1, 3, 32, 32), "proxyclip",
                            vfm_features=torch.zeros(1, 4, 4, 4))


def test_cli_proxyclip_is_the_segmenter(proxyclip, tmp_path, capsys, monkeypatch):
    """``ovdense segment --method proxyclip --vfm NAME --vfm-weights FILE`` writes the labels of
    ``Segmenter(..., vfm=create_vfm(NAME, FILE))`` and records the VFM in its JSON; a file of another
    VFM is one clear error."""
    from PIL import Image
    from tool_runs import run_cli

    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "scene.png"
    Image.fromarray(_scene(120, 150, seed=5)).save(image)
    weights = proxyclip["files"]["dino_vitb8"]
    config, model_weights = proxyclip["config"], proxyclip["weights"]
    argv = ["segment", image, "--model", config, "--pretrained", model_weights, "--method", "proxyclip",
            "--classes", "sky|ground,red circle,blue square", "--templates", "single", "--short-side", "112",
            "--window", "112", "56", "--vfm-weights", weights]
    code, _, err = run_cli([*argv, "--vfm", "dino_vitb8", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    labels = np.asarray(Image.open(tmp_path / "out" / "scene_labels.png"))
    report = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert report["settings"]["vfm"] == {"name": "dino_vitb8", "weights": str(weights)}
    expected = Segmenter(proxyclip["backbone"], "proxyclip", ["sky, ground", "red circle", "blue square"],
                         templates="single", short_side=112, window=(112, 56),
                         vfm=create_vfm("dino_vitb8", weights)).predict(np.asarray(Image.open(image))).labels
    assert np.array_equal(labels, expected) and len(np.unique(labels)) > 1
    code, _, err = run_cli([*argv, "--vfm", "dinov2_vitb14_reg", "--out", tmp_path / "other"], capsys)
    assert code == 2 and "is not dinov2_vitb14_reg's weights" in err and len(err.strip().splitlines()) == 1
