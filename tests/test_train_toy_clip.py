"""The toy CLIP training script: outputs, reproducibility, resuming and its losses' targets
(a few tiny steps)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ovdense.data.synthetic import COLOURS, SHAPES, SceneConfig, render_scene
from ovdense.errors import OvdenseError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_toy_clip  # noqa: E402


def run(out, steps, *extra):
    """``steps`` steps in all: 2 supervised, the rest locked-image text tuning."""
    argv = ["--out", str(out), "--stage1-steps", "2", "--stage2-steps", str(steps - 2),
            "--stage1-batch", "4", "--stage2-batch", "4", "--warmup", "1", "--single-steps", "1",
            "--threads", "1", *extra]
    assert train_toy_clip.main(argv) == 0


def test_writes_weights_config_curve_and_resumes_exactly(tmp_path):
    run(tmp_path / "a", 4)
    for name in ("config.json", "model.safetensors", "loss.png", "checkpoint.pt"):
        assert (tmp_path / "a" / name).is_file(), name
    assert json.loads((tmp_path / "a" / "config.json").read_text())["embed_dim"] == 128
    whole = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in whole.values())

    run(tmp_path / "b", 4)  # same seed, same weights
    again = load_file(str(tmp_path / "b" / "model.safetensors"))
    for key in whole:
        torch.testing.assert_close(whole[key], again[key], rtol=0, atol=0)

    # stopped inside stage 1, resumed across the stage boundary: the same weights as the
    # uninterrupted run, bit for bit
    run(tmp_path / "c", 4, "--minutes", "1e-9")  # stops after its first step
    assert torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["step"] == 1
    run(tmp_path / "c", 4, "--resume")
    state = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4
    resumed = load_file(str(tmp_path / "c" / "model.safetensors"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)

    # stopped exactly at the stage boundary (its checkpoint holds stage 1's optimizer), resumed
    run(tmp_path / "d", 2)
    assert torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["step"] == 2
    run(tmp_path / "d", 4, "--resume")
    at_boundary = load_file(str(tmp_path / "d" / "model.safetensors"))
    for key in whole:
        torch.testing.assert_close(at_boundary[key], whole[key], rtol=0, atol=0)


def test_stage_two_locks_the_image_tower(tmp_path):
    run(tmp_path / "a", 2)  # stage 1 only
    run(tmp_path / "b", 4)  # stage 1, then 2 steps of stage 2
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    second = load_file(str(tmp_path / "b" / "model.safetensors"))
    for key in first:
        same = torch.equal(first[key], second[key])
        if key.startswith("visual."):
            assert same, key
    assert not torch.equal(first["token_embedding.weight"], second["token_embedding.weight"])


def test_an_existing_run_is_never_overwritten_without_resume(tmp_path):
    run(tmp_path / "a", 2)
    before = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    with pytest.raises(OvdenseError, match="--resume"):
        run(tmp_path / "a", 3)
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(OvdenseError, match="no .*checkpoint.pt"):
        run(tmp_path / "new", 3, "--resume")


def test_token_targets_are_pixel_fractions():
    """Each patch's target is the share of its pixels per class, summed over colours for the
    shape vocabulary and over shapes for the colour vocabulary — counted here by hand."""
    config = SceneConfig(size=(16, 16), objects=(2, 2), radius=(0.3, 0.4))
    scene = render_scene(np.random.default_rng(7), config)
    labels = torch.from_numpy(scene.colour_shape)[None]
    pair, shape, colour = train_toy_clip.token_targets(labels, 8)
    assert pair.shape == (1, 4, 31) and shape.shape == (1, 4, 6) and colour.shape == (1, 4, 7)
    for index, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        cell = scene.colour_shape[8 * r:8 * r + 8, 8 * c:8 * c + 8].ravel()
        for k in range(31):
            assert pair[0, index, k].item() == pytest.approx(np.mean(cell == k))
        shapes = np.where(cell > 0, (cell - 1) % len(SHAPES) + 1, 0)
        colours = np.where(cell > 0, (cell - 1) // len(SHAPES) + 1, 0)
        for k in range(6):
            assert shape[0, index, k].item() == pytest.approx(np.mean(shapes == k))
        for k in range(7):
            assert colour[0, index, k].item() == pytest.approx(np.mean(colours == k))


def test_image_targets_spread_over_what_the_image_shows():
    scene = render_scene(np.random.default_rng(3), SceneConfig(size=(64, 64), objects=(3, 3)))
    pair, shape, colour = train_toy_clip.image_targets([scene.objects])
    shown_pairs = {f"{o.colour} {o.shape}" for o in scene.objects}
    for k, name in enumerate(train_toy_clip.PAIRS):
        assert pair[0, k].item() == pytest.approx(1 / len(shown_pairs) if name in shown_pairs else 0)
    shown_shapes = {o.shape for o in scene.objects}
    for k, name in enumerate(SHAPES):
        assert shape[0, k].item() == pytest.approx(1 / len(shown_shapes) if name in shown_shapes else 0)
    shown_colours = {o.colour for o in scene.objects}
    for k, name in enumerate(COLOURS):
        assert colour[0, k].item() == pytest.approx(1 / len(shown_colours) if name in shown_colours else 0)


def test_value_path_is_maskclips_dense_path():
    """The stage-1 value-path tokens equal what the MaskCLIP method reads at inference
    (``encode_tokens(..., "maskclip")``), so the token labeling trains that very path."""
    import open_clip

    from ovdense.backbone.dense import encode_tokens

    torch.manual_seed(0)
    model = open_clip.CLIP(**train_toy_clip.TOY_CONFIG)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens, value = train_toy_clip.image_tower(model.visual, images, True)
        reference = encode_tokens(model.visual, images, "maskclip")
        vanilla = encode_tokens(model.visual, images, "vanilla")
        model.visual.output_tokens = False
        torch.testing.assert_close(pooled, model.visual(images))
    torch.testing.assert_close(value, reference[:, 1:])
    torch.testing.assert_close(tokens, vanilla[:, 1:])
