"""The synthetic world: seeded, and its ground truth is what is drawn."""

import math

import numpy as np
import pytest
from tool_runs import load_tool

from ovdense.data.synthetic import (
    COLOURS,
    SHAPES,
    SceneConfig,
    caption,
    colour_shape_classes,
    render_scene,
    shape_mask,
)


def test_same_seed_same_scene():
    a, b = render_scene(7, SceneConfig(defect_rate=0.5)), render_scene(7, SceneConfig(defect_rate=0.5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.instance, b.instance)
    assert a.caption == b.caption and a.objects == b.objects
    assert not np.array_equal(a.image, render_scene(8).image)


@pytest.mark.parametrize("shape, area", [
    ("circle", math.pi), ("square", 2.0), ("triangle", 3 * math.sqrt(3) / 4),
    ("ring", math.pi * (1 - 0.55**2)), ("star", 5 * math.sin(2 * math.pi / 10) * 0.45),
])
def test_shape_areas_match_geometry(shape, area):
    r = 70.0  # large, so the rasterised boundary adds little
    mask = shape_mask(shape, (160, 160), (80.0, 80.0), r, 0.3)
    assert mask.sum() == pytest.approx(area * r * r, rel=0.05)


@pytest.mark.parametrize("seed", range(10))
def test_masks_match_the_drawn_pixels(seed):
    scene = render_scene(seed, SceneConfig(noise=0.0, defect_rate=0.5))
    assert scene.objects, "every scene has at least one object"
    for index, obj in enumerate(scene.objects, start=1):
        pixels = scene.image[(scene.instance == index) & ~scene.defect].astype(float)
        colour = np.array(COLOURS[obj.colour], float)
        ratio = pixels / np.maximum(colour, 1)
        assert len(pixels) > 0
        # one flat colour per object: the object's colour times one shade in [0.85, 1.1]
        assert np.ptp(pixels, axis=0).max() <= 1
        assert 0.83 <= np.median(ratio[:, colour.argmax()]) <= 1.12
    assert not (scene.defect & (scene.instance == 0)).any()  # defects lie on objects
    np.testing.assert_array_equal(scene.colour > 0, scene.instance > 0)
    for index, obj in enumerate(scene.objects, start=1):
        inside = scene.instance == index
        assert (scene.colour[inside] == 1 + list(COLOURS).index(obj.colour)).all()
        assert (scene.shape[inside] == 1 + SHAPES.index(obj.shape)).all()
        name = colour_shape_classes()[scene.colour_shape[inside][0]]
        assert name == f"{obj.colour} {obj.shape}"


def test_occlusion_leaves_each_object_visible():
    config = SceneConfig(objects=(4, 4), radius=(0.15, 0.2), min_visible=0.5)
    for seed in range(10):
        scene = render_scene(seed, config)
        for index, obj in enumerate(scene.objects, start=1):
            full = shape_mask(obj.shape, config.size, obj.centre, obj.radius, obj.angle).sum()
            assert (scene.instance == index).sum() >= 0.5 * full


def test_caption_names_every_object():
    scene = render_scene(3, SceneConfig(objects=(3, 3), defect_rate=1.0))
    for obj in scene.objects:
        assert obj.name in scene.caption
    assert scene.caption.endswith(f"on a {scene.texture} background")
    assert caption([]) == "a photo of an empty background"


@pytest.mark.parametrize("defect", ["scratched", "holed", "stained"])
def test_every_defect_is_visible(defect):
    config = SceneConfig(objects=(1, 1), defect_rate=1.0, defects=(defect,), shapes=("ring", "star"))
    for seed in range(10):
        scene = render_scene(seed, config)
        assert scene.objects[0].defect == defect
        assert scene.defect.any() and not (scene.defect & (scene.instance == 0)).any()


def test_open_vocabulary_split():
    """20 base and 10 novel pairs by (colour index + shape index) mod 3, every colour and shape
    in both parts; base_labels sends base pairs to their position and novel ones to ignore."""
    from ovdense.data.synthetic import base_labels, open_vocabulary_split

    base, novel = open_vocabulary_split()
    assert len(base) == 20 and len(novel) == 10 and not set(base) & set(novel)
    expected_novel = [f"{c} {s}" for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)
                      if (i + j) % 3 == 0]
    assert novel == expected_novel
    assert novel[:3] == ["red circle", "red star", "green triangle"]
    for part in (base, novel):
        assert {n.split()[0] for n in part} == set(COLOURS) and {n.split()[1] for n in part} == set(SHAPES)
    mapping = base_labels()
    names = colour_shape_classes()
    assert mapping[0] == 0
    for label, name in enumerate(names[1:], start=1):
        assert mapping[label] == (255 if name in novel else 1 + base.index(name))
    scene = render_scene(3, SceneConfig(objects=(4, 4)))
    train = mapping[scene.colour_shape]
    assert ((train == 255) == np.isin(scene.colour_shape, [names.index(n) for n in novel])).all()


def test_toy_scores_of_tools_eval_san_toy():
    """tools/analysis/eval_san_toy.py's scores on a hand-checked 2×3 scene: object-pixel accuracy over
    all, base and novel objects and by colour; the novel mIoU over the novel classes present."""
    tool = load_tool("analysis/eval_san_toy")
    names = colour_shape_classes()
    assert names[1] == "red circle" and names[2] == "red square" and names[7] == "green square"
    truth = np.array([[0, 1, 2], [7, 255, 0]])  # red circle is novel; red and green squares are base
    prediction = np.array([[0, 1, 3], [12, 5, 1]])  # right; red triangle (right colour); blue square
    scores = tool.ToyScores()
    scores.update(prediction, truth)
    result = scores.result()
    assert result["acc_all"] == pytest.approx(1 / 3) and result["acc_colour"] == pytest.approx(2 / 3)
    assert result["acc_novel"] == 1.0 and result["acc_base"] == 0.0
    # novel classes present: 1 (1 hit, predicted twice: IoU 1/2) and 12, blue square (predicted
    # once, never true: 0); base classes 2, 3, 7 present, none right
    assert result["miou_novel"] == pytest.approx(0.25) and result["miou_base"] == 0.0
