"""The demo's Find like this tab (``demo/app.py``): CLIPSeg with a class named by an example image.

The work functions are checked on the shipped toy model and a synthetic scene against
``ClipSegSegmenter(backbone, classes, image_prompts={name: (rgb, mask)}).predict`` built here from
the same example and mask: a mask upload, a box region (= the rectangular mask), the whole example;
the head cache keys examples by their pixels; every bad input is one ``OvdenseError`` line. The page
offers the tab only where a CLIPSeg head is at hand (the toy's ships, ``--clipseg-head`` for
others), and its ``/prompt_segment`` handler, called through gradio_client on a page served on
loopback, answers the same label map.

The example shows a green circle (object 1) and an orange square (object 2) on a plain backdrop;
the query shows a green circle, a blue square and a blue star, and the classes by words are
``background, blue star``: the image prompt's class takes a different set of pixels for the
circle's mask, the circle's box and the whole example (each asserted), so a test passes only if
the demo used the region it was given.
"""

import importlib.util
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdense import OvdenseError
from ovdense.io import colorize, overlay

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "demo" / "app.py"
CLASSES = [("background",), ("blue star",)]
NAME = "like this"


@pytest.fixture(scope="module")
def app():
    """``demo/app.py`` imported as a module (``demo/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("ovdense_demo_app_clipseg", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def scenes():
    """``(example, query)``: synthetic scenes (``ovdense.data.synthetic``)."""
    from ovdense.data.synthetic import SceneConfig, render_scene

    few = {"colours": ("orange", "blue", "green"), "shapes": ("circle", "star", "square")}
    example = render_scene(np.random.default_rng([3, 7]),
                           SceneConfig(size=(96, 128), objects=(2, 2), textures=("plain",), **few))
    query = render_scene(np.random.default_rng([3, 11]), SceneConfig(size=(80, 112), objects=(3, 3), **few))
    assert [o.name for o in example.objects] == ["green circle", "orange square"]
    assert [o.name for o in query.objects] == ["green circle", "blue square", "blue star"]
    return example, query


@pytest.fixture(scope="module")
def files(scenes, tmp_path_factory):
    """The example, the circle's mask (0/255) and the query as PNG uploads."""
    example, query = scenes
    folder = tmp_path_factory.mktemp("uploads")
    paths = {"example": folder / "example.png", "mask": folder / "mask.png", "query": folder / "query.png"}
    Image.fromarray(example.image).save(paths["example"])
    Image.fromarray(((example.instance == 1) * 255).astype(np.uint8)).save(paths["mask"])
    Image.fromarray(query.image).save(paths["query"])
    return paths


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of a mask's pixels, ends exclusive."""
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _reference(toy, example_rgb, mask, rgb):
    from ovdense.heads.clipseg import ClipSegSegmenter

    segmenter = ClipSegSegmenter(toy, [list(c) for c in CLASSES], image_prompts={NAME: (example_rgb, mask)})
    return segmenter.predict(rgb)


# --------------------------------------------------------------------------------------------
# The work functions


def test_a_mask_upload_names_a_class_by_example(app, toy, scenes, files):
    example, query = scenes
    circle = example.instance == 1
    rgb, mask, notice = app.read_image_prompt(files["example"], files["mask"])
    np.testing.assert_array_equal(rgb, example.image)
    np.testing.assert_array_equal(mask, circle)
    assert mask.dtype == bool and notice == ""

    shown = app.segment_image(app.Heads(toy), query.image, CLASSES, "clipseg", bg_threshold=0.5,
                              image_prompts={NAME: (rgb, mask)})
    want = _reference(toy, example.image, circle, query.image)
    assert want.classes == ("background", "blue star", NAME)
    found = np.bincount(want.labels.ravel(), minlength=3)
    assert found[2] >= 100, "the example's class finds nothing: the comparison would be weak"
    np.testing.assert_array_equal(shown.label_map, colorize(want.labels))
    np.testing.assert_array_equal(shown.overlay, overlay(query.image, want.labels, want.classes))
    assert [row[:2] for row in shown.shares] == [["background", "background"], ["blue star", "blue star"],
                                                 [NAME, "an example image"]]
    np.testing.assert_allclose([row[2] for row in shown.shares], 100 * found / found.sum(), atol=0.01)
    # the mask matters: the whole example finds other pixels
    whole = _reference(toy, example.image, np.ones_like(circle), query.image)
    assert not np.array_equal(whole.labels, want.labels)


def test_a_region_is_the_rectangular_mask(app, toy, scenes, files):
    example, query = scenes
    x0, y0, x1, y1 = _box(example.instance == 1)  # 85, 54, 114, 82: wider than tall, off the diagonal
    rectangle = np.zeros(example.instance.shape, bool)
    rectangle[y0:y1, x0:x1] = True
    assert app.parse_region(f"{x0}, {y0}, {x1}, {y1}") == (x0, y0, x1, y1)
    assert app.parse_region(f" {x1} {y1} {x0},{y0} ") == (x0, y0, x1, y1)  # corners the other way round
    assert app.parse_region("  ") is None
    rgb, mask, _ = app.read_image_prompt(files["example"], region=app.parse_region(f"{x0},{y0},{x1},{y1}"))
    np.testing.assert_array_equal(mask, rectangle)

    shown = app.segment_image(app.Heads(toy), query.image, CLASSES, "clipseg", bg_threshold=0.5,
                              image_prompts={NAME: (rgb, mask)})
    want = _reference(toy, example.image, rectangle, query.image)
    np.testing.assert_array_equal(shown.label_map, colorize(want.labels))
    # the box matters: the circle's own mask and the whole example each find other pixels
    for other in (example.instance == 1, np.ones_like(rectangle)):
        assert not np.array_equal(_reference(toy, example.image, other, query.image).labels, want.labels)

    # a box over the edge is clipped to the example
    _, clipped, _ = app.read_image_prompt(files["example"], region=(-5, 90, 20, 500))
    edge = np.zeros_like(rectangle)
    edge[90:, :20] = True
    np.testing.assert_array_equal(clipped, edge)
    _, whole, _ = app.read_image_prompt(files["example"])  # neither mask nor region: the whole example
    assert whole.all() and whole.shape == rectangle.shape


def test_a_large_example_and_its_region_are_downscaled_together(app, tmp_path, rng):
    rgb = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    small, mask, notice = app.read_image_prompt(tmp_path / "big.png", region=(0, 0, 64, 96), max_side=64)
    assert small.shape == (48, 64, 3) and "downscaled from 128×96 to 64×48" in notice
    np.testing.assert_array_equal(mask, np.arange(64)[None, :].repeat(48, 0) < 32)  # the left half


def test_the_head_cache_keys_examples_by_their_pixels(app, toy, scenes):
    """The same example (another array, equal pixels) reuses the head; one pixel of the example or
    of its mask, or another name, builds another; the key holds digests, not the arrays."""
    example, query = scenes
    circle, square = example.instance == 1, example.instance == 2
    heads = app.Heads(toy, size=8)
    first = heads.segmenter("clipseg", CLASSES, image_prompts={NAME: (example.image, circle)})
    again = heads.segmenter("clipseg", CLASSES, image_prompts={NAME: (example.image.copy(), circle.copy())})
    assert again is first
    touched = example.image.copy()
    touched[0, 0, 0] ^= 1
    one_more = circle.copy()
    one_more[0, 0] = True
    for prompts in ({NAME: (touched, circle)}, {NAME: (example.image, one_more)},
                    {"other name": (example.image, circle)}):
        assert heads.segmenter("clipseg", CLASSES, image_prompts=prompts) is not first
    assert len(heads._cache) == 4

    def leaves(value):
        if isinstance(value, tuple):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    # the key holds no pixels: no array, no bytes, nothing larger than a digest's 64 characters
    sizes = [sys.getsizeof(leaf) for key in heads._cache for leaf in leaves(key)]
    assert not [leaf for key in heads._cache for leaf in leaves(key) if isinstance(leaf, (np.ndarray, bytes))]
    assert max(sizes) <= sys.getsizeof("x" * 80), max(sizes)

    # two examples in a row on one Heads: each result is its own example's
    for mask in (circle, square):
        shown = app.segment_image(heads, query.image, CLASSES, "clipseg", bg_threshold=0.5,
                                  image_prompts={NAME: (example.image, mask)})
        want = _reference(toy, example.image, mask, query.image)
        np.testing.assert_array_equal(shown.label_map, colorize(want.labels))


@pytest.mark.parametrize("upload, message", [
    (dict(example=None), "no example image: upload an image"),
    (dict(mask="mask", region=(0, 0, 4, 4)), "as a mask or as a region, not both"),
    (dict(mask="small"), "the mask is 128×64 px, the example 128×96: upload a mask of the example's size"),
    (dict(mask="black"), "black.png is all black: the mask must be non-zero on the object"),
    (dict(region=(200, 0, 300, 50)), "the region 200, 0, 300, 50 holds no pixel of the 128×96 example"),
    (dict(region=(10, 10, 10, 50)), "the region 10, 10, 10, 50 holds no pixel"),
    (dict(example="text"), "notes.png is not a readable image"),
    (dict(mask="text"), "notes.png is not a readable image"),
])
def test_read_image_prompt_refuses(app, files, tmp_path, upload, message):
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(black)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((64, 128), 255, np.uint8)).save(small)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    named = {"example": files["example"], "mask": files["mask"], "black": black, "small": small, "text": text}
    arguments = {"example": "example", "mask": None, "region": None, **upload}
    for key in ("example", "mask"):
        arguments[key] = named.get(arguments[key])
    with pytest.raises(OvdenseError) as info:
        app.read_image_prompt(**arguments)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("text, message", [
    ("12, 5, 7", "is not four whole numbers"), ("1, 2, 3, x", "is not four whole numbers"),
    ("1.5, 2, 3, 4", "is not four whole numbers"),
])
def test_parse_region_refuses(app, text, message):
    with pytest.raises(OvdenseError, match=message):
        app.parse_region(text)


def test_parse_prompt_name(app):
    assert app.parse_prompt_name("  like this ", CLASSES) == "like this"
    refusals = [
        ("", CLASSES, "the example has no name"), ("  ", CLASSES, "the example has no name"),
        ("a, b", CLASSES, "is one name: no commas or |"), ("a|b", CLASSES, "is one name"),
        ("x" * 81, CLASSES, "longer than 80 characters"),
        ("blue star", CLASSES, "'blue star' is already a class"),
        ("dog", [("cat", "dog")], "'dog' is already a class"),  # a synonym too
        ("thing", [(f"c{i}",) for i in range(64)], "64 classes and the example; the demo takes at most 64"),
    ]
    for text, classes, message in refusals:
        with pytest.raises(OvdenseError) as info:
            app.parse_prompt_name(text, classes)
        assert message in str(info.value) and "\n" not in str(info.value), (text, str(info.value))


def test_image_prompts_need_a_clipseg_head(app, toy, tiny_backbone, scenes):
    example, query = scenes
    prompts = {NAME: (example.image, example.instance == 1)}
    with pytest.raises(OvdenseError, match="MaskCLIP has no image_prompts option"):
        app.segment_image(app.Heads(toy), query.image, CLASSES, "maskclip", image_prompts=prompts)
    assert app.Heads(toy).prompt_methods == ["clipseg"]
    assert app.Heads(tiny_backbone).prompt_methods == []
    with pytest.raises(OvdenseError, match="no CLIPSeg head: start the demo with --clipseg-head PATH"):
        app.segment_image(app.Heads(tiny_backbone), query.image, CLASSES, "clipseg", image_prompts=prompts)


# --------------------------------------------------------------------------------------------
# The page


def _api_names(blocks) -> set:
    return {fn.api_name for fn in blocks.fns.values()}


def test_the_page_has_the_tab_only_with_a_clipseg_head(app, toy, tiny_backbone, tmp_path):
    """The toy's head ships; a backbone without one gets the tab from ``clipseg_head=`` (the
    ``--clipseg-head`` flag), here a random-init head saved for it."""
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")
    from ovdense.heads.clipseg import ClipSegConfig, ClipSegHead, save_head

    assert {"prompt_segment", "prompt_preview"} <= _api_names(app.build_app(toy))
    assert not {"prompt_segment", "prompt_preview"} & _api_names(app.build_app(tiny_backbone))
    head = save_head(tmp_path / "clipseg_head.safetensors",
                     ClipSegHead(tiny_backbone, ClipSegConfig(reduce_dim=16, mlp=32, image_size=64)),
                     tiny_backbone)
    assert "prompt_segment" in _api_names(app.build_app(tiny_backbone, clipseg_head=head))


def test_demo_refuses_a_wrong_clipseg_head_before_serving(app, tmp_path, capsys):
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")
    bad = tmp_path / "clipseg_head.safetensors"
    bad.write_bytes(b"not safetensors")
    assert app.main(["--model", "toy", "--clipseg-head", str(bad), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdense demo: error: ") and len(err.strip().splitlines()) == 1, err


def test_the_tab_through_gradio_client(app, toy, scenes, files, tmp_path, monkeypatch):
    """``/prompt_segment`` of a page served on 127.0.0.1: the label map it sends (a PNG) is the
    reference's; a mask and a region both given answer one line; ``/prompt_preview`` dims all
    but the marked box."""
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")
    gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
    from gradio_client import handle_file

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    example, query = scenes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = app.build_app(toy)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                      download_files=str(tmp_path / "downloads"))
        upload = {key: handle_file(str(path)) for key, path in files.items()}
        inputs = [upload["query"], "background, blue star", upload["example"], upload["mask"], "", NAME,
                  "clipseg", 0.5]
        _, label_map, shares, status, _ = client.predict(*inputs, api_name="/prompt_segment")
        want = _reference(toy, example.image, example.instance == 1, query.image)
        np.testing.assert_array_equal(np.asarray(Image.open(label_map).convert("RGB")), colorize(want.labels))
        assert [row[0] for row in shares["data"]] == ["background", "blue star", NAME]
        assert status.startswith(f"**clipseg** with the example *{NAME}* on 112×80 px")

        inputs[4] = "0, 0, 10, 10"
        with pytest.raises(gradio_client.exceptions.AppError) as info:
            client.predict(*inputs, api_name="/prompt_segment")
        assert str(info.value) == "give the object as a mask or as a region, not both: clear one of them"

        x0, y0, x1, y1 = _box(example.instance == 1)
        shown, notice = client.predict(handle_file(str(files["example"])), None, f"{x0}, {y0}, {x1}, {y1}",
                                       api_name="/prompt_preview")
        rectangle = np.zeros(example.instance.shape, bool)
        rectangle[y0:y1, x0:x1] = True
        expected = np.where(rectangle[..., None], example.image, example.image // 3)
        np.testing.assert_array_equal(np.asarray(Image.open(shown).convert("RGB")), expected)
        assert notice == ""
    finally:
        page.close()
