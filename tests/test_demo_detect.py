"""The demo's Detect tab (``demo/app.py``): its work function against ``Detector.predict`` on the same
image, its head cache, and its refusals; the page offers the tab only where an F-ViT head is at hand.

The head is conftest.py's ``fvit_head``: a random-init F-ViT for the toy backbone built in plain torch
(``PlainFViT``, the file ``ovdense.mm.detection.export_head`` writes); no mmcv needed.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ovdense import OvdenseError

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "demo" / "app.py"
CLASSES = ["red circle", "green square", "blue triangle", "purple star", "orange ring"]
# pycocotools 2.0 under numpy 2 (its own decode, used here as the reference)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning")


@pytest.fixture(scope="module")
def app():
    """``demo/app.py`` imported as a module (``demo/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("ovdense_demo_app_detect", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def scene():
    from ovdense.data.synthetic import SceneConfig, render_scene

    return render_scene(np.random.default_rng([99, 3]), SceneConfig(size=(88, 120))).image


def test_detect_image_is_the_detectors_prediction(app, toy_env_cache, fvit_head, scene):
    from pycocotools import mask as mask_utils

    from ovdense.heads.fvit import Detector

    everything = Detector(toy_env_cache, CLASSES, head_checkpoint=fvit_head,
                          score_threshold=0.0).predict(scene).scores
    assert len(everything) >= 4
    ranked = np.sort(everything)[::-1]
    threshold = float((ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2)  # keeps half
    heads = app.Heads(toy_env_cache, fvit_head=fvit_head, size=2)
    shown = app.detect_image(heads, scene, [(c,) for c in CLASSES], threshold)
    want = Detector(toy_env_cache, CLASSES, head_checkpoint=fvit_head,
                    score_threshold=threshold).predict(scene)
    assert 0 < len(want.scores) == len(shown.rows) == len(shown.report["detections"]) < len(everything)
    assert shown.report["classes"] == CLASSES
    for k, (row, entry) in enumerate(zip(shown.rows, shown.report["detections"])):
        x1, y1, x2, y2 = (float(v) for v in want.boxes[k])
        name = CLASSES[int(want.class_ids[k])]
        assert row[0] == entry["class"] == name and entry["category_id"] == int(want.class_ids[k])
        assert row[1] == pytest.approx(float(want.scores[k]), abs=1e-3) and row[1] >= threshold - 5e-4
        np.testing.assert_allclose(row[2:], [x1, y1, x2 - x1, y2 - y1], atol=0.051)
        np.testing.assert_allclose(entry["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
        rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), want.masks[k])
    assert shown.overlay.shape == scene.shape and shown.overlay.dtype == np.uint8
    assert not np.array_equal(shown.overlay, scene)
    assert shown.seconds > 0

    # one detector per (classes, threshold), the `size` most recent kept
    first = heads.detector([(c,) for c in CLASSES], threshold)
    assert heads.detector([(c,) for c in CLASSES], threshold) is first
    assert heads.detector([(c,) for c in CLASSES], 0.5) is not first
    heads.detector([("red circle",)], 0.5)
    assert len(heads._cache) == 2 and heads.detector([(c,) for c in CLASSES], threshold) is not first


def test_detect_image_refusals(app, toy_env_cache, fvit_head, tiny_backbone, scene):
    heads = app.Heads(toy_env_cache, fvit_head=fvit_head)
    with pytest.raises(OvdenseError, match="one name per class"):
        app.detect_image(heads, scene, [("red circle", "red disc"), ("blue star",)])
    with pytest.raises(OvdenseError, match="listed twice"):
        app.detect_image(heads, scene, [("red circle",), ("red circle",)])
    with pytest.raises(OvdenseError, match="trained on backbone"):
        app.detect_image(app.Heads(tiny_backbone, fvit_head=fvit_head), scene, [("a",)])
    no_head = app.Heads(tiny_backbone)
    assert no_head.fvit_head is None  # nothing ships for a random JSON-config backbone
    with pytest.raises(OvdenseError, match="--fvit-head"):
        app.detect_image(no_head, scene, [("a",)])


def test_the_page_has_a_detect_tab_only_with_a_head(app, toy_env_cache, fvit_head, tiny_backbone):
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")

    def api_names(blocks):
        return {fn.api_name for fn in blocks.fns.values()}

    assert "detect" in api_names(app.build_app(toy_env_cache, fvit_head=fvit_head))
    assert "detect" not in api_names(app.build_app(tiny_backbone))


def test_demo_refuses_a_wrong_fvit_head_before_serving(app, tmp_path, capsys, toy_env_cache):
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")
    bad = tmp_path / "fvit_head.safetensors"
    bad.write_bytes(b"not safetensors")
    assert app.main(["--model", "toy", "--fvit-head", str(bad), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdense demo: error: ") and len(err.strip().splitlines()) == 1, err
    assert "not a safetensors" in err


@pytest.mark.parametrize("shipped", [True, False], ids=["head-ships", "none-ships"])
def test_the_shipped_head_is_the_default(app, toy_env_cache, fvit_head, monkeypatch, shipped):
    from ovdense.heads import fvit

    monkeypatch.setattr(fvit, "default_head_checkpoint", lambda backbone: fvit_head if shipped else None)
    assert app.Heads(toy_env_cache).fvit_head == (fvit_head if shipped else None)
    other = Path("elsewhere.safetensors")
    assert app.Heads(toy_env_cache, fvit_head=other).fvit_head == other  # --fvit-head wins
