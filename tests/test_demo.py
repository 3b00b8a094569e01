"""The demo page (``demo/app.py``): its input checks and work functions directly, then the
whole page in a real headless Chromium against a server started as a user starts it.

The browser test uploads a generated scene, types classes, runs with "compare methods" on, and
compares the label map and the overlay the page shows, pixel for pixel, with
``Segmenter.predict`` + ``colorize`` / ``overlay`` computed here on the same image (the page
sends PNGs, which are lossless); the Anomaly tab's score and heat map are checked against
``WinClip.predict``, and (with the toy model, whose CLIPSeg head ships) the Find like this tab's
label map for an uploaded example and mask against ``ClipSegSegmenter.predict``
(``tests/test_demo_clipseg.py`` checks that tab's functions). It also uploads a text file named
``.png`` and expects the error message in the page, and saves screenshots: to
``$OVDENSE_TEST_ARTIFACTS`` (default: pytest's temporary folder, printed), and to
``$OVDENSE_DEMO_SCREENSHOT`` too when that is set (``OVDENSE_DEMO_SCREENSHOT=demo/screenshot.png``
refreshes the demo page's picture in docs/demo.md).

The model is the trained toy CLIP when ``ovdense/assets`` has it, else a tiny random ViT: the
comparison is with the library's own prediction, which holds for any weights.

It skips only where gradio, playwright or a Chromium binary is not installed
(``pip install -e ".[demo]" playwright``; ``apt-get install chromium``).
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense import OvdenseError, Segmenter, create_backbone
from ovdense.backbone.dense import METHODS
from ovdense.io import colorize, heatmap_overlay, overlay
from ovdense.registry import DEFAULT_HEADS, HEADS

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "demo" / "app.py"
ASSETS = ROOT / "ovdense" / "assets"


@pytest.fixture(scope="module")
def app():
    """``demo/app.py`` imported as a module (``demo/`` is not a package); importing it must not
    need gradio or start anything."""
    spec = importlib.util.spec_from_file_location("ovdense_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# the toy model's kind of defaults (native-size windows, one template) keep every method fast
SMALL_DEFAULTS = {"templates": "single", "short_side": 64, "window": [32, 16]}


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    """The suite's tiny random ViT (``conftest.TINY_CONFIG``) with toy-like inference defaults."""
    from conftest import TINY_CONFIG

    path = tmp_path_factory.mktemp("demo-config") / "tiny-vit.json"
    path.write_text(json.dumps({**TINY_CONFIG, "ovdense": SMALL_DEFAULTS}))
    return path


@pytest.fixture(scope="module")
def small_backbone(small_config, tmp_path_factory):
    torch.manual_seed(0)
    return create_backbone(str(small_config), cache_dir=tmp_path_factory.mktemp("demo-cache"))


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Inputs


def test_parse_classes_commas_lines_and_synonyms(app):
    parsed = app.parse_classes("sky, person|man | woman,\n car ,, ")
    assert parsed == [("sky",), ("person", "man", "woman"), ("car",)]


@pytest.mark.parametrize("text, message", [
    ("", "empty"), (" , | ,", "empty"), (",".join(f"c{i}" for i in range(65)), "at most 64"),
    ("x" * 81, "longer than 80"),
])
def test_parse_classes_refuses(app, text, message):
    with pytest.raises(OvdenseError, match=message):
        app.parse_classes(text)


def test_read_image_downscales_with_a_notice(app, tmp_path, rng):
    rgb = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    path = _write_png(tmp_path / "wide.png", rgb)
    small, notice = app.read_image(path, max_side=100)
    assert small.shape == (67, 100, 3)
    assert "downscaled from 300×200 to 100×67" in notice
    same, notice = app.read_image(path, max_side=300)
    np.testing.assert_array_equal(same, rgb)
    assert notice == ""


def test_read_image_refuses_non_images(app, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(OvdenseError, match="notes.png is not a readable image"):
        app.read_image(text)
    other = tmp_path / "notes.txt"
    other.write_text("not an image")
    with pytest.raises(OvdenseError, match="notes.txt is not an image file"):
        app.read_image(other)
    with pytest.raises(OvdenseError, match="no image"):
        app.read_image(None)


def test_read_image_refuses_oversized_files_before_decoding(app, tmp_path, monkeypatch):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    with pytest.raises(OvdenseError) as info:
        app.read_image(bomb)
    assert str(info.value).startswith("bomb.png is 50000×50000 = 2500.0 megapixels, over the limit of 100")
    assert str(tmp_path) not in str(info.value)  # the page names the upload, not the server's folder
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 999)
    with pytest.raises(OvdenseError, match="big.png has 0.0 MB; the demo takes at most"):
        app.read_image(big)


# --------------------------------------------------------------------------------------------
# The work functions


def test_segment_image_is_the_segmenters_prediction(app, small_backbone, rng):
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    classes = [("grass",), ("dog", "puppy"), ("sky",)]
    heads = app.Heads(small_backbone, size=2)
    shown = app.segment_image(heads, rgb, classes, "maskclip", bg_threshold=0.3)
    result = Segmenter(small_backbone, "maskclip", [list(c) for c in classes], bg_threshold=0.3).predict(rgb)
    np.testing.assert_array_equal(shown.label_map, colorize(result.labels))
    np.testing.assert_array_equal(shown.overlay, overlay(rgb, result.labels, result.classes))
    counts = np.bincount(result.labels.ravel(), minlength=3)
    assert [row[0] for row in shown.shares] == ["grass", "dog", "sky"]
    assert shown.shares[1][1] == "dog, puppy"
    np.testing.assert_allclose([row[2] for row in shown.shares], 100 * counts / counts.sum(), atol=0.01)
    # the cache returns the same head for the same request and keeps the `size` most recent
    first = heads.segmenter("maskclip", classes, bg_threshold=0.3, pamr=None)
    assert heads.segmenter("maskclip", classes, bg_threshold=0.3, pamr=None) is first
    assert heads.segmenter("maskclip", classes, bg_threshold=0.4, pamr=None) is not first
    heads.segmenter("sclip", classes)
    assert len(heads._cache) == 2
    assert heads.segmenter("maskclip", classes, bg_threshold=0.3, pamr=None) is not first


def test_compare_methods_runs_each_and_reports_what_cannot_run(app, small_backbone, rng):
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    steps = []
    results = app.compare_methods(app.Heads(small_backbone), rgb, [("a",), ("b",)],
                                  methods=["vanilla", "no-such-method"],
                                  on_step=lambda i, n, m: steps.append((i, n, m)))
    assert steps == [(0, 2, "vanilla"), (1, 2, "no-such-method")]
    assert isinstance(results["vanilla"], app.Segmentation)
    assert "unknown method" in results["no-such-method"]
    rows = app.comparison_table(results)
    assert rows[0][0] == "vanilla" and rows[0][3] == ""
    assert rows[1][1] is None and rows[1][3].startswith("not run: unknown method")


def test_san_in_the_segment_tab_is_the_shipped_heads_prediction(app, small_backbone, rng, tmp_path):
    """The toy model offers SAN with its shipped head (labels = SanSegmenter's); a model without
    a head does not offer it; options SAN lacks are refused, not ignored."""
    from ovdense.heads.san import SanSegmenter

    assert "san" not in app.Heads(small_backbone).methods
    toy = create_backbone("toy", cache_dir=tmp_path / "cache")
    heads = app.Heads(toy)
    trained = [name for name in heads.methods if HEADS[name].trained]
    assert trained == ["san", "clipseg"]  # the trained heads that ship for the toy, in the registry's order
    # the first choice: the toy's own head (its config file's "ovdense" entry), else the registry's
    own = json.loads((ASSETS / "toy-clip.json").read_text())["ovdense"]["method"]
    assert heads.default_method == own != DEFAULT_HEADS["segmentation"]
    assert app.Heads(small_backbone).default_method == DEFAULT_HEADS["segmentation"]
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    classes = [("background",), ("red circle", "red disc"), ("blue square",)]
    shown = app.segment_image(heads, rgb, classes, "san")
    want = SanSegmenter(toy, [list(c) for c in classes]).predict(rgb)
    np.testing.assert_array_equal(shown.label_map, colorize(want.labels))
    with pytest.raises(OvdenseError, match="SAN has no bg_threshold"):
        app.segment_image(heads, rgb, classes, "san", bg_threshold=0.3)


def test_clipseg_in_the_segment_tab_is_the_shipped_heads_prediction(app, small_backbone, rng, tmp_path):
    """The toy model offers CLIPSeg with its shipped head (labels = ClipSegSegmenter's, a class's
    synonyms each a prompt); a model without a head does not offer it."""
    from ovdense.heads.clipseg import ClipSegSegmenter

    assert "clipseg" not in app.Heads(small_backbone).methods
    toy = create_backbone("toy", cache_dir=tmp_path / "cache")
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    classes = [("background",), ("red circle", "red disc"), ("blue square",)]
    shown = app.segment_image(app.Heads(toy), rgb, classes, "clipseg")
    want = ClipSegSegmenter(toy, [list(c) for c in classes]).predict(rgb)
    np.testing.assert_array_equal(shown.label_map, colorize(want.labels))


def test_anomaly_map_is_winclips_and_forgets_references(app, small_backbone, rng):
    from ovdense.anomaly.winclip import WinClip

    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heads = app.Heads(small_backbone)
    zero_shot = WinClip(small_backbone, "bottle").predict([rgb])[0]
    few_shot_head = WinClip(small_backbone, "bottle")
    few_shot_head.set_references([reference])
    few_shot = few_shot_head.predict([rgb])[0]

    heat, score, amap, mode = app.anomaly_map(heads, rgb, "bottle", [reference])
    assert score == pytest.approx(few_shot.score, abs=1e-6)
    np.testing.assert_allclose(amap, few_shot.map, atol=1e-6)
    assert mode == "WinCLIP+ (1-shot)"
    heat, score, amap, mode = app.anomaly_map(heads, rgb, " bottle ")  # the cached head, no references
    assert score == pytest.approx(zero_shot.score, abs=1e-6) and mode == "WinCLIP (zero-shot)"
    np.testing.assert_array_equal(heat, heatmap_overlay(rgb, amap))
    with pytest.raises(OvdenseError, match="object name is empty"):
        app.anomaly_map(heads, rgb, "  ")


def test_sam_clip_image_is_the_heads_result(app, small_backbone):
    """The SAM + CLIP tab's function on a tiny random SAM (as ``test_sam_clip`` builds one)."""
    pytest.importorskip("segment_anything", reason="segment-anything is not installed (the [sam] extra)")
    pytest.importorskip("pycocotools", reason="pycocotools is not installed (the [sam] extra)")
    from segment_anything.build_sam import _build_sam

    from ovdense.data.synthetic import SceneConfig, render_scene
    from ovdense.heads.sam_clip import SamClipSegmenter, draw_instances

    torch.manual_seed(0)
    sam = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     encoder_global_attn_indexes=[], checkpoint=None)
    rgb = render_scene(3, SceneConfig(size=(48, 64), objects=(3, 3))).image
    classes = [("background",), ("red", "crimson"), ("blue",)]
    few = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}  # fast
    drawn, label_map, rows = app.sam_clip_image(app.Heads(small_backbone, sam), rgb, classes, **few)
    result = SamClipSegmenter(small_backbone, sam, [list(c) for c in classes], **few).segment(rgb)
    np.testing.assert_array_equal(label_map, colorize(result.labels))
    np.testing.assert_array_equal(drawn, draw_instances(rgb, result))
    assert rows == [[i.name, round(i.score, 3), i.area] for i in result.instances]
    assert rows, "no mask: the comparison would be empty"
    with pytest.raises(OvdenseError, match="--sam-checkpoint"):
        app.sam_clip_image(app.Heads(small_backbone), rgb, classes, **few)


# --------------------------------------------------------------------------------------------
# The page in a browser

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server"]
METHOD = "maskclip"  # not the default, so the test picks it in the page
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_arguments(small_backbone, small_config: Path, folder: Path) -> list[str]:
    """``--model toy`` when the trained toy CLIP is installed; else the tiny random ViT, its
    weights saved to a file so that this process and the server use the same ones. The test
    compares the page with the library's own prediction, which holds for any weights."""
    if (ASSETS / "toy-clip.json").is_file() and (ASSETS / "toy-clip.safetensors").is_file():
        return ["--model", "toy"]
    from safetensors.torch import save_file

    weights = folder / "tiny-vit.safetensors"
    save_file({k: v.contiguous() for k, v in small_backbone.model.state_dict().items()}, str(weights))
    return ["--model", str(small_config), "--pretrained", str(weights)]


def _start_server(model_args: list[str], folder: Path) -> tuple[subprocess.Popen, str, Path]:
    """``python demo/app.py ARGS --port P`` as a user starts it (offline, one thread)."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", OVDENSE_CACHE=str(folder / "cache"),
               GRADIO_TEMP_DIR=str(folder / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    log = folder / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, str(APP), *model_args, "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}/", log


def _wait_until_serving(server: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}:\n{log.read_text()}")
        try:
            with LOCAL.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo did not answer at {url} within {seconds:.0f} s:\n{log.read_text()}")


def _shown_image(page, selector: str) -> np.ndarray:
    """The RGB pixels of the image the page shows in ``selector`` (fetched from its ``src``)."""
    src = page.get_attribute(f"{selector} img", "src")
    with LOCAL.open(src, timeout=10) as response:
        assert response.headers.get("content-type", "").startswith("image/png"), src
        return np.asarray(Image.open(response).convert("RGB"))


def _missing_for_the_browser() -> str | None:
    """Why the browser test cannot run here (``None`` if it can)."""
    if importlib.util.find_spec("gradio") is None:
        return "gradio is not installed (pip install -e '.[demo]')"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if _chromium() is None:
        return "no Chromium binary on PATH (apt-get install chromium)"
    return None


@pytest.mark.skipif(_missing_for_the_browser() is not None, reason=str(_missing_for_the_browser()))
def test_demo_page_in_a_browser(small_backbone, small_config, tmp_path_factory, capsys):
    from playwright import sync_api

    from ovdense.data.synthetic import SceneConfig, render_scene

    chromium = _chromium()

    folder = tmp_path_factory.mktemp("demo")
    artifacts = Path(os.environ.get("OVDENSE_TEST_ARTIFACTS", folder / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\ndemo test artefacts (screenshots, server log): {artifacts}")

    scene = render_scene(3, SceneConfig(size=(192, 256), objects=(2, 3)))
    image = _write_png(folder / "scene.png", scene.image)
    bad = folder / "notes.png"
    bad.write_text("this is a text file, not a picture")
    names = list(dict.fromkeys(o.colour + " " + o.shape for o in scene.objects))
    classes_text = ", ".join(["background|backdrop"] + names)
    model_args = _model_arguments(small_backbone, small_config, folder)
    server, url, log = _start_server(model_args, folder)
    try:
        backbone = create_backbone("toy") if model_args[1] == "toy" else small_backbone
        segmenter = Segmenter(backbone, METHOD, [["background", "backdrop"], *names])
        reference = segmenter.predict(scene.image)
        assert len(np.unique(reference.labels)) >= 2, "a one-class map would make the comparison weak"
        from ovdense.anomaly.winclip import WinClip

        defects = WinClip(backbone, "ring").predict([scene.image])[0]
        prompted = None
        if model_args[1] == "toy":  # its CLIPSeg head ships: the Find like this tab is there
            from ovdense.heads.clipseg import ClipSegSegmenter

            example = render_scene(5, SceneConfig(size=(96, 128), objects=(2, 3)))
            example_file = _write_png(folder / "example.png", example.image)
            mask_file = _write_png(folder / "mask.png", ((example.instance == 1) * 255).astype(np.uint8))
            prompted = ClipSegSegmenter(backbone, ["background"], bg_threshold=0.5, image_prompts={
                "like this": (example.image, example.instance == 1)}).predict(scene.image)
        _wait_until_serving(server, url, log)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)

            # a text file named .png: one line in the page, no stack trace
            page.set_input_files("#image-upload input[type=file]", str(bad))
            message = page.get_by_text("notes.png is not a readable image").first
            message.wait_for()
            assert "Traceback" not in page.content()
            page.screenshot(path=str(artifacts / "demo_bad_upload.png"))

            page.reload()
            page.set_input_files("#image-upload input[type=file]", str(image))
            page.wait_for_selector("#input-preview img")
            page.fill("#classes textarea", classes_text)
            page.click("#method input")
            page.locator("ul[role=listbox] li", has_text=METHOD).click()
            page.click("#compare input")
            page.click("#run-segment")
            page.wait_for_selector("#label-map img")
            page.wait_for_selector("#compare-gallery img")

            label_map = _shown_image(page, "#label-map")
            np.testing.assert_array_equal(label_map, colorize(reference.labels))
            shown_overlay = _shown_image(page, "#overlay")
            expected = overlay(scene.image, reference.labels, reference.classes)
            np.testing.assert_array_equal(shown_overlay, expected)
            assert METHOD in page.inner_text("#segment-status")
            table = page.inner_text("#compare-table")
            assert all(method in table for method, spec in METHODS.items() if not spec.needs)  # no VFM here
            page.wait_for_timeout(500)  # let the gallery settle for the picture
            page.screenshot(path=str(artifacts / "demo.png"), full_page=True)

            page.get_by_role("tab", name="Anomaly").click()
            page.set_input_files("#anomaly-upload input[type=file]", str(image))
            page.locator("#object-name").get_by_role("textbox").fill("ring")
            page.click("#run-anomaly")
            page.wait_for_selector("#heatmap img")
            score = page.inner_text("#anomaly-score")
            assert float(score.split("image score ")[1].split()[0]) == pytest.approx(defects.score, abs=1e-3)
            heat = _shown_image(page, "#heatmap").astype(int)
            assert np.abs(heat - heatmap_overlay(scene.image, defects.map)).max() <= 1
            page.screenshot(path=str(artifacts / "demo_anomaly.png"), full_page=True)

            if prompted is not None:  # an example and its mask name a class: CLIPSeg's labels
                page.get_by_role("tab", name="Find like this").click()
                page.set_input_files("#prompt-upload input[type=file]", str(image))
                page.set_input_files("#prompt-example input[type=file]", str(example_file))
                page.set_input_files("#prompt-mask input[type=file]", str(mask_file))
                page.wait_for_selector("#prompt-preview img")
                page.click("#run-prompt")
                page.wait_for_selector("#prompt-label-map img")
                np.testing.assert_array_equal(_shown_image(page, "#prompt-label-map"),
                                              colorize(prompted.labels))
                assert "with the example like this" in page.inner_text("#prompt-status")
                page.screenshot(path=str(artifacts / "demo_find_like_this.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.copy(log, artifacts / "server.log")
    if os.environ.get("OVDENSE_DEMO_SCREENSHOT"):
        shutil.copy(artifacts / "demo.png", os.environ["OVDENSE_DEMO_SCREENSHOT"])
