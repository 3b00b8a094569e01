"""CLIP-DINOiser (``ovdense/heads/clipdinoiser.py``) and its converter
(``tools/model_converters/clipdinoiser2ovdense.py``) against the official wysoczanska/clip_dinoiser run
as is from its mirror (``models/`` and ``configs/`` of HEAD), with the open_clip it pins (2.24, the
``v2.24.0`` tag of the open_clip mirror) imported beside pip's for the import only.

Both sides share random weights: a ViT-B/16-shaped CLIP of 4 blocks (width 768, which the official code
hard-codes, ``cd.py:232``) built by the official open_clip and loaded by ovdense from a JSON config and
a weights file, and random convolutions written as an official ``last.pt`` and converted by the
converter. What is stubbed: ``create_model_from_pretrained`` returns copies of that CLIP (no download),
and the two mmcv/mmseg 0.x names the official code imports (``mmcv.utils.Registry``, ``mmseg.ops.resize``)
get minimal stand-ins; the mmseg 0.27 sliding-window loop of the official eval is written out
(``clip_dinoiser_slide``). The loaders live in tests/official_segmenters.py (the benchmark uses them too).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_segmenters import clip_dinoiser_slide, import_clip_dinoiser, official_clip_dinoiser, resize
from tool_runs import load_tool

from ovdense.errors import OvdenseError
from ovdense.heads import clipdinoiser as cdn
from ovdense.heads.clipdinoiser import ClipDinoiserConfig, ClipDinoiserHead, ClipDinoiserSegmenter, load_head

#: ViT-B/16-shaped (patch 16, native 224, width 768, 12 heads), 4 blocks; a small text tower
TOWER = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2},
}
CLASSES = ["background", "red circle", "blue square", "green triangle"]
SIZES = [(448, 448), (300, 452)]  # one eval window; a non-square one the model pads to 304 × 464
SMALL = (160, 240)  # off the native grid, quick: the mutations' input
#: the official model's outputs the fixture keeps: (size, background rule); "mid": δ at the median best
#: probability, so that both sides of ``max prob < δ`` occur (with 0.99 every patch is uncertain here)
CASES = [(SIZES[0], False), (SIZES[0], True), (SIZES[1], False), (SIZES[1], True), (SIZES[1], "mid"),
         (SMALL, False)]


def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """Flat coloured rectangles on a flat ground with a little noise."""
    rng = np.random.default_rng(seed)
    rgb = np.broadcast_to(rng.integers(0, 256, 3), (height, width, 3)).astype(np.float64)
    for _ in range(6):
        y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
        rgb[y:y + rng.integers(40, 120), x:x + rng.integers(40, 140)] = rng.integers(0, 256, 3)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def _spread(clip: torch.nn.Module, seed: int) -> None:
    """Random weights that keep the patches apart: LayerNorm weights near 1, position and class
    embeddings of 0.5, the rest of 0.05, the residual branches' output projections 5× smaller (so the
    tokens stay close to their patches). On these inputs the correlations straddle γ = 0.2 and the
    background logits straddle 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.named_parameters():
            parts = name.split(".")  # LayerNorms: ln_pre, ln_1, ln_2, ln_post, ln_final
            if len(parts) > 1 and parts[-2].startswith("ln_") and parts[-1] == "weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith(("positional_embedding", "class_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
                if name.endswith(("out_proj.weight", "c_proj.weight")):
                    p.mul_(0.2)


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    """``ImageToTensorV2``: ``[1, 3, H, W]`` RGB / 255."""
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0


class NotATensor:
    """Something ``torch.load(weights_only=True)`` refuses."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The official modules, one random CLIP (official open_clip) and its ovdense twin, an official
    ``last.pt`` and its converted head file, the official model built on them, and its outputs on the
    ``SIZES`` inputs with and without the background rule."""
    from ovdense import create_backbone

    root = tmp_path_factory.mktemp("clipdinoiser")
    off = import_clip_dinoiser(root / "src")
    torch.manual_seed(0)
    clip = off.open_clip.CLIP(**TOWER).eval()
    _spread(clip, seed=1)
    weights, config = root / "clip.pt", root / "tower.json"
    torch.save(clip.state_dict(), weights)
    config.write_text(json.dumps(TOWER))
    backbone = create_backbone(str(config), pretrained=str(weights), cache_dir=root / "cache")
    generator = torch.Generator().manual_seed(2)
    head_state = {
        "obj_proj.weight": torch.randn(256, 768, 3, 3, generator=generator) * 0.02,
        "obj_proj.bias": torch.randn(256, generator=generator) * 0.5,
        "bkg_decoder.weight": torch.randn(1, 768, 1, 1, generator=generator),
        "bkg_decoder.bias": torch.randn(1, generator=generator) * 0.1,
    }
    last = root / "last.pt"
    torch.save({"epoch": 99, "model_state_dict": head_state}, last)
    converter = load_tool("model_converters/clipdinoiser2ovdense")
    head_file = converter.convert(last, root / "converted", backbone)
    with pytest.MonkeyPatch.context() as patch:
        model = official_clip_dinoiser(off, clip, CLASSES, head_state, patch)
    inputs = {size: torch.rand((1, 3) + size, generator=generator) for size in SIZES + [SMALL]}
    outputs, delta = {}, {}
    with torch.no_grad():
        for size, found in CASES:
            model.apply_found = bool(found)
            if found == "mid":
                delta[size] = float(outputs[size, False].max(dim=1).values.median())
                model.delta = delta[size]
            outputs[size, found] = model(inputs[size].clone())
            model.delta = 0.99
    return SimpleNamespace(off=off, clip=clip, backbone=backbone, weights=weights, config=config,
                           head_state=head_state, last=last, head_file=head_file, model=model,
                           inputs=inputs, outputs=outputs, delta=delta, converter=converter, root=root)


def _segmenter(world, **kwargs) -> ClipDinoiserSegmenter:
    return ClipDinoiserSegmenter(world.backbone, CLASSES, head_checkpoint=world.head_file, **kwargs)


def _borderline(seg: ClipDinoiserSegmenter, x: torch.Tensor, probs: torch.Tensor, eps: float = 1e-5):
    """``[h, w]``: patches whose output a float-rounding difference may flip (Q9 of the note): a
    correlation within ``eps`` of γ in their row, a background logit within ``eps`` of 0, a best
    probability within ``eps`` of δ."""
    p = seg.backbone.patch_size
    padded = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
    with torch.inference_mode():
        _, c = seg.head.features(seg.backbone, seg.backbone.normalize(padded))
        bkg, A = seg.head(c)
    h, w = c.shape[-2:]
    near = ((A[0] - seg.gamma).abs() < eps).any(dim=-1).reshape(h, w)
    if seg.found_background:
        best = probs[0].max(dim=0).values
        near |= (bkg[0, 0].abs() < eps) | ((best - seg.delta).abs() < eps)
    return near


# --------------------------------------------------------------------------------------------
# Parity with the official model


RULES = {False: "plain", True: "background-rule", "mid": "background-rule-mid-delta"}


@pytest.mark.parametrize("size,found", CASES[:5],
                         ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else RULES[v])
def test_dense_probabilities_are_the_official_models(world, size, found):
    """``ClipDinoiserSegmenter.dense`` against the official ``CLIP_DINOiser.forward`` (its padding,
    pos-embed rule, ln_2 tap, MaskCLIP value path, pooling, 100× softmax and the FOUND rule): within
    1e-4 everywhere but patches a rounding difference could flip (Q9 of the note; none so far)."""
    delta = world.delta.get(size) if found == "mid" else None
    seg = _segmenter(world, found_background=bool(found), delta=delta)
    x = world.inputs[size]
    ours = seg.dense(x)
    official = world.outputs[size, found]
    assert ours.shape == official.shape == (1, len(CLASSES), -(-size[0] // 16), -(-size[1] // 16))
    diff = (ours - official).abs().amax(dim=1)[0]  # h, w
    near = _borderline(seg, x, ours) if diff.max() >= 1e-4 else torch.zeros_like(diff, dtype=torch.bool)
    print(f"{size} {found}: max |ours - official| = {diff.max():.2e}, borderline patches {int(near.sum())}")
    assert near.float().mean() < 0.05
    assert diff[~near].max() < 1e-4
    if found:  # the rule fires on some patches and not on others
        fired = official[0, 0] == 1.0
        assert 0.05 < fired.float().mean() < 0.95
        assert torch.equal((ours[0, 0] == 1.0)[~near], fired[~near])


def test_text_embeddings_are_the_official_ones(world):
    """``class_embeddings`` of the official ``MaskClipHead`` (80 ImageNet templates, ``mc.py:157-177``)."""
    seg = _segmenter(world)
    official = world.model.clip_backbone.decode_head.class_embeddings
    assert (seg.text - official).abs().max() < 1e-5


def test_labels_are_the_official_eval(world):
    """``predict`` against the official eval: mmcv's rescale to short side 448, the official slide loop
    (448 / 224: three windows here), resized to the image, softmax, argmax; the background rule on (class
    0 is ``background``, as for VOC). The averaged window probabilities agree within 1e-4."""
    rgb = _scene(260, 400, seed=3)
    seg = _segmenter(world)
    assert seg.found_background
    scale = min(2048 / 400, 448 / 260)  # mmcv imrescale, img_scale (2048, 448)
    size = (int(260 * scale + 0.5), int(400 * scale + 0.5))
    resized = cv2.resize(rgb, size[::-1], interpolation=cv2.INTER_LINEAR)
    world.model.apply_found = True
    average, probs = clip_dinoiser_slide(world.model, _tensor(resized), 448, 224, (260, 400))
    assert tuple(seg.prepare(rgb).shape[-2:]) == size == (448, 689)
    kept = []
    canvas = seg.canvas
    seg.canvas = lambda x: kept.append(canvas(x)) or kept[-1]  # what predict averages, kept
    result = seg.predict(rgb)
    print(f"slide canvas: max |ours - official| = {(kept[0] - average[0]).abs().max():.2e}")
    assert (kept[0] - average[0]).abs().max() < 1e-4
    assert result.labels.shape == (260, 400)
    top2 = probs[0].topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-5).numpy()
    labels = probs[0].argmax(dim=0).numpy()
    assert clear.mean() > 0.98 and len(np.unique(labels)) > 1
    assert np.array_equal(result.labels[clear], labels[clear])
    scores = resize(average, size=(260, 400), mode="bilinear", align_corners=False)[0].max(dim=0).values
    assert np.abs(result.scores - scores.numpy()).max() < 1e-4


def test_batch_is_per_image_where_the_official_writes_into_image_0(world):
    """Departure (``cd.py:293``): the official override reshapes to ``[1, K, -1]``, so with two images it
    writes image 1's background into image 0's channels and leaves image 1's alone. ``dense`` on a batch
    gives each image's batch-1 official output."""
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 224, 224, generator=generator)
    seg = _segmenter(world, found_background=True)
    world.model.apply_found = True
    with torch.no_grad():
        single = torch.cat([world.model(x[i:i + 1].clone()) for i in range(2)])
        batched = world.model(x.clone())
    ours = seg.dense(x)
    assert (ours - single).abs().max() < 1e-4
    assert (batched[1] - single[1]).abs().max() > 0.1  # image 1 lost its background
    assert (batched[0] - single[0]).abs().max() > 0.1  # image 0 got image 1's


def test_zero_norms_give_nan_officially_and_finite_probabilities_here(world):
    """Departure (NaN guard): with ``obj_proj`` all zero the official cosines divide 0 by 0
    (``cd.py:266``) and every output is NaN; here ``F.normalize`` gives zero correlations, zero pooled
    features and the uniform ``1/K``."""
    zero = {**world.head_state, "obj_proj.weight": torch.zeros(256, 768, 3, 3),
            "obj_proj.bias": torch.zeros(256)}
    world.model.load_state_dict(zero, strict=False)
    world.model.apply_found = False
    try:
        with torch.no_grad():
            official = world.model(world.inputs[SMALL].clone())
    finally:
        world.model.load_state_dict(world.head_state, strict=False)
    head = ClipDinoiserHead(world.backbone)
    head.load_state_dict(zero)
    seg = ClipDinoiserSegmenter(world.backbone, CLASSES, head=head, found_background=False)
    ours = seg.dense(world.inputs[SMALL])
    assert torch.isnan(official).all()
    assert torch.allclose(ours, torch.full_like(ours, 1 / len(CLASSES)))


@pytest.mark.parametrize("mutation", ["dino-pos-rule", "block-output-tap", "logit-scale-50", "no-gamma",
                                      "normalised-maskclip", "tap-block-2"])
def test_a_wrong_reading_is_caught(world, monkeypatch, mutation):
    """Each plausible misreading of the official code moves the 160×240 output by more than 1e-3."""
    kwargs = {}
    if mutation == "dino-pos-rule":
        monkeypatch.setattr(cdn, "POS_RESIZE", "dino")  # ovdense's training-free (n + 0.1)/g rule
    elif mutation == "block-output-tap":
        monkeypatch.setattr(cdn, "TAP_KIND", "output")
    elif mutation == "logit-scale-50":
        monkeypatch.setattr(cdn, "LOGIT_SCALE", 50.0)
    elif mutation == "no-gamma":
        kwargs["gamma"] = 0.0
    elif mutation == "normalised-maskclip":
        real = cdn.pool
        monkeypatch.setattr(cdn, "pool", lambda f, A, gamma: real(F.normalize(f, dim=1), A, gamma))
    seg = _segmenter(world, found_background=False, **kwargs)
    if mutation == "tap-block-2":
        seg.head.tap_block = 2  # ln_2 of block 2 instead of block 1 (= −3 of 4)
    assert (seg.dense(world.inputs[SMALL]) - world.outputs[SMALL, False]).abs().max() > 1e-3


def test_the_mutation_test_input_is_itself_official(world):
    """The unmutated head on the mutations' input is the official output (so their differences are theirs)."""
    ours = _segmenter(world, found_background=False).dense(world.inputs[SMALL])
    assert (ours - world.outputs[SMALL, False]).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# The segmenter's contract


def test_predict_result_and_settings(world):
    seg = _segmenter(world, short_side=0, window=(0, 0), bg_threshold=0.9, found_background=False)
    result = seg.predict(_scene(70, 90, seed=1))
    assert result.labels.shape == result.scores.shape == (70, 90)
    assert (result.labels[result.scores < 0.9] == 0).all()
    settings = json.loads(json.dumps(seg.settings()))
    assert settings["method"] == "clipdinoiser" and settings["clipdinoiser_config"]["tap"] == -3
    defaults = _segmenter(world).settings()
    assert (defaults["short_side"], defaults["window"], defaults["gamma"], defaults["delta"]) == \
        (448, [448, 224], 0.2, 0.99)
    assert defaults["found_background"] is True  # class 0 is "background"
    assert _segmenter(world, found_background=None).found_background
    objects = ClipDinoiserSegmenter(world.backbone, CLASSES[1:], head_checkpoint=world.head_file)
    assert not objects.found_background


def test_synonyms_take_the_max_over_their_words(world):
    """An ovdense addition: a class with several words scores its best word (the softmax over every word)."""
    x = world.inputs[SIZES[0]][..., :224, :224]
    words = ClipDinoiserSegmenter(world.backbone, CLASSES + ["red disc"], head_checkpoint=world.head_file,
                                  found_background=False).dense(x)
    joined = ClipDinoiserSegmenter(world.backbone, ["background", "red circle, red disc"] + CLASSES[2:],
                                   head_checkpoint=world.head_file, found_background=False).dense(x)
    expected = torch.cat([words[:, :1], torch.maximum(words[:, 1:2], words[:, 4:5]), words[:, 2:4]], dim=1)
    assert torch.allclose(joined, expected, atol=1e-6)


def test_without_a_head_one_error_names_the_official_file_and_the_converter(world):
    with pytest.raises(OvdenseError, match=r"checkpoints/last\.pt.*clipdinoiser2ovdense\.py"):
        ClipDinoiserSegmenter(world.backbone, CLASSES)


def test_a_head_of_another_backbone_is_refused(world, tiny_backbone):
    with pytest.raises(OvdenseError, match="was trained on backbone .*not on this one"):
        load_head(world.head_file, tiny_backbone)
    with pytest.raises(OvdenseError, match="was trained on backbone"):
        ClipDinoiserSegmenter(tiny_backbone, CLASSES, head_checkpoint=world.head_file)
    clipseg_head = Path(cdn.__file__).parents[1] / "assets" / "clipseg-toy-head.safetensors"
    with pytest.raises(OvdenseError, match="not a CLIP-DINOiser head"):
        load_head(clipseg_head, world.backbone)
    with pytest.raises(OvdenseError, match="not a safetensors CLIP-DINOiser head.*clipdinoiser2ovdense"):
        load_head(world.last, world.backbone)


@pytest.mark.parametrize("kwargs,message", [
    ({"window": (224, 448)}, "stride is larger"),
    ({"window": (448,)}, "crop, stride"),
    ({"short_side": -1}, "short_side"),
    ({"gamma": 2.0}, "gamma"),
    ({"delta": 1.5}, "delta"),
    ({"bg_threshold": -0.1}, "bg_threshold"),
    ({"batch_windows": 0}, "batch_windows"),
])
def test_bad_options_are_one_clear_error(world, kwargs, message):
    with pytest.raises(OvdenseError, match=message):
        _segmenter(world, **kwargs)


def test_a_tap_outside_the_tower_is_refused(world):
    with pytest.raises(OvdenseError, match="tap 3 is not a block in"):
        ClipDinoiserHead(world.backbone, ClipDinoiserConfig(tap=3))


# --------------------------------------------------------------------------------------------
# The converter


def test_the_converter_keeps_the_official_tensors(world, tmp_path, capsys):
    head = load_head(world.head_file, world.backbone)
    for key, value in world.head_state.items():
        assert torch.equal(head.state_dict()[key], value)
    rc = world.converter.main([str(world.last), str(tmp_path), "--backbone", str(world.config),
                               "--pretrained", str(world.weights)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert _contents(tmp_path / "clipdinoiser-head.safetensors") == _contents(world.head_file)


def _contents(path) -> tuple[dict, dict]:
    """A head file's metadata and tensors (as lists: comparable with ``==``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}


def _run(world, tmp_path, capsys, checkpoint) -> str:
    out = tmp_path / "out"
    rc = world.converter.main([str(checkpoint), str(out), "--backbone", str(world.config),
                               "--pretrained", str(world.weights)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())
    return err


def test_the_converter_refuses_a_wrong_file(world, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "give the official checkpoints/last.pt" in _run(world, tmp_path, capsys, text)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": world.head_state, "cfg": NotATensor()}, pickled)
    err = _run(world, tmp_path, capsys, pickled)
    assert "Unsupported global" in err and "weights_only=False" not in err
    other = tmp_path / "clipseg.pt"
    torch.save({"film_mul.weight": torch.zeros(2, 2)}, other)
    assert "missing keys ['obj_proj.weight'" in _run(world, tmp_path, capsys, other)
    assert "not found" in _run(world, tmp_path, capsys, tmp_path / "absent.pt")


def test_the_converter_refuses_wrong_shapes(world, tmp_path, capsys):
    odd = tmp_path / "odd.pt"
    torch.save({"model_state_dict": {**world.head_state, "bkg_decoder.weight": torch.zeros(1, 768, 3, 3)}},
               odd)
    assert "bkg_decoder.weight has shape (1, 768, 3, 3)" in _run(world, tmp_path, capsys, odd)
    narrow = tmp_path / "narrow.pt"
    torch.save({"model_state_dict": {"obj_proj.weight": torch.zeros(256, 512, 3, 3), "obj_proj.bias":
                                     torch.zeros(256), "bkg_decoder.weight": torch.zeros(1, 512, 1, 1),
                                     "bkg_decoder.bias": torch.zeros(1)}}, narrow)
    assert "backbone's width is 768" in _run(world, tmp_path, capsys, narrow)


def test_the_converter_writes_atomically(world, tmp_path, monkeypatch):
    """A failed conversion, or a write that fails at the rename, leaves the old file as it was and no
    temporary file beside it."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "clipdinoiser-head.safetensors"
    target.write_bytes(b"the old head")
    broken = tmp_path / "broken.pt"
    partial = {k: v for k, v in world.head_state.items() if k != "obj_proj.bias"}
    torch.save({"model_state_dict": partial}, broken)
    with pytest.raises(world.converter.ConversionError, match="missing keys"):
        world.converter.convert(broken, out, world.backbone)
    import ovdense.io

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ovdense.io.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        world.converter.convert(world.last, out, world.backbone)
    monkeypatch.undo()
    assert target.read_bytes() == b"the old head" and [p.name for p in out.iterdir()] == [target.name]
    world.converter.convert(world.last, out, world.backbone)
    assert [p.name for p in out.iterdir()] == [target.name]
    assert _contents(target) == _contents(world.head_file)


@pytest.mark.parametrize("found", ["--found-background", "--no-found-background"])
def test_cli_clipdinoiser_is_the_segmenter(world, tmp_path, capsys, monkeypatch, found):
    """``ovdense segment --method clipdinoiser --head-checkpoint FILE`` writes ``ClipDinoiserSegmenter``'s
    labels with the same head; ``--found-background`` / ``--no-found-background`` reach it."""
    from PIL import Image
    from tool_runs import run_cli

    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "scene.png"
    Image.fromarray(_scene(100, 140, seed=9)).save(image)
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", image, "--model", world.config, "--pretrained", world.weights,
                            "--method", "clipdinoiser", "--head-checkpoint", world.head_file, found,
                            "--classes", ",".join(CLASSES), "--window", "64", "32", "--short-side", "96",
                            "--out", out], capsys)
    assert code == 0, err
    labels = np.asarray(Image.open(out / "scene_labels.png"))
    report = json.loads((out / "scene.json").read_text())
    on = found == "--found-background"
    assert report["settings"]["found_background"] is on
    expected = _segmenter(world, found_background=on, window=(64, 32), short_side=96).predict(
        np.asarray(Image.open(image))).labels
    assert np.array_equal(labels, expected) and len(np.unique(labels)) > 1
