"""tools/analysis/toy_clip_objects.py: the object crops it scores (no model needed)."""

import numpy as np
import pytest
from tool_runs import load_tool

from ovdense.data.synthetic import SceneConfig, render_scene

objects = load_tool("analysis/toy_clip_objects")


@pytest.mark.parametrize("centre, radius", [((5.0, 5.0), 10.0), ((120.0, 64.0), 12.0), ((64.0, 64.0), 80.0)])
def test_crop_is_a_square_inside_the_image(centre, radius):
    x0, y0, side = objects.crop_box(centre, radius, (128, 128))
    assert side == round(min(2 * objects.MARGIN * radius, 128))
    assert 0 <= x0 <= 128 - side and 0 <= y0 <= 128 - side


def test_cuts_hold_the_whole_visible_object_and_alone_is_only_it():
    scenes = [render_scene(np.random.default_rng([5, i]), SceneConfig()) for i in range(6)]
    cuts = objects.cut_objects(scenes, 128)  # native = a crop's largest size: no resampling loss
    assert len(cuts) == sum(len(s.objects) for s in scenes)
    k = 0
    for scene in scenes:
        for index, obj in enumerate(scene.objects, start=1):
            x0, y0, side = objects.crop_box(obj.centre, obj.radius, scene.image.shape[:2])
            inside = np.zeros(scene.instance.shape, bool)
            inside[y0:y0 + side, x0:x0 + side] = True
            visible = scene.instance == index
            assert visible[~inside].sum() == 0  # the crop holds every visible pixel of the object
            alone, as_cut, got = cuts[k]
            assert got is obj and alone.shape == as_cut.shape == (128, 128, 3)
            k += 1
    # alone on black: outside the object's mask nothing is left (checked at native = crop size)
    scene = scenes[0]
    obj = scene.objects[0]
    x0, y0, side = objects.crop_box(obj.centre, obj.radius, scene.image.shape[:2])
    alone, as_cut, _ = objects.cut_objects([scene], side)[0]
    mask = scene.instance[y0:y0 + side, x0:x0 + side] == 1
    assert (alone[~mask] == 0).all()
    np.testing.assert_array_equal(alone[mask], scene.image[y0:y0 + side, x0:x0 + side][mask])
    np.testing.assert_array_equal(as_cut, scene.image[y0:y0 + side, x0:x0 + side])
