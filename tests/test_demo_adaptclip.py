"""The demo's Anomaly tab with AdaptCLIP (``demo/app.py``): ``anomaly_map(..., method="AdaptCLIP")``,
the ``Heads`` cache's one AdaptCLIP head per backbone, the ``--adaptclip-head`` flag, and the tab's
``/anomaly`` handler through gradio_client on a page served on loopback.

The adapters are a random-init ``AdaptClipHead`` for the shipped toy backbone (128 px, σ = 1) written
here with ``save_head``, so the tests need neither the toy's trained adapters (which may not ship yet)
nor a GPU. Every score and map the demo answers is compared with ``AdaptClip(...).predict`` built
here on the same inputs (the library's path, not the demo's): zero-shot, 2-shot, and zero-shot again
on the cached head (it must forget the references). Every refusal (no adapters, references of mixed
sizes, a query of another size) is one ``OvdenseError`` line, in the page one message.
"""

import importlib.util
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense import OvdenseError
from ovdense.io import heatmap_overlay

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "demo" / "app.py"
SIZE = (48, 40)  # H, W of the query and the references: not square, not the head's 128 px


@pytest.fixture(scope="module")
def app():
    """``demo/app.py`` imported as a module (``demo/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("ovdense_demo_app_adaptclip", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def head_file(toy, tmp_path_factory) -> Path:
    """Random-init AdaptCLIP adapters for the toy backbone, as ``save_head`` writes trained ones."""
    from ovdense.anomaly.adaptclip import AdaptClipConfig, AdaptClipHead, save_head

    torch.manual_seed(0)
    head = AdaptClipHead(toy, AdaptClipConfig(image_size=128, sigma=1.0))
    return save_head(tmp_path_factory.mktemp("adaptclip-head") / "h.safetensors", head, toy)


@pytest.fixture(scope="module")
def images():
    """``(query, [reference, reference])``: random RGB ``uint8 [48, 40, 3]`` images."""
    rng = np.random.default_rng([30, 1])
    query = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    return query, [rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(2)]


def _direct(toy, head_file, query, references=None):
    """The library's own answer: a fresh ``AdaptClip`` on the same adapters and images."""
    from ovdense.anomaly.adaptclip import AdaptClip

    return AdaptClip(toy, head_checkpoint=head_file, references=references).predict([query])[0]


# --------------------------------------------------------------------------------------------
# The work function


def test_anomaly_map_is_adaptclips_zero_and_few_shot(app, toy, head_file, images):
    query, references = images
    zero = _direct(toy, head_file, query)
    few = _direct(toy, head_file, query, references)
    assert np.abs(few.map - zero.map).max() > 1e-2  # the references change the map: the check can fail

    heads = app.Heads(toy, adaptclip_head=head_file)
    heat, score, amap, mode = app.anomaly_map(heads, query, "bottle", references, method="AdaptCLIP")
    assert amap.shape == SIZE and amap.dtype == np.float32
    assert -1e-5 <= amap.min() <= amap.max() <= 1 + 1e-5  # probabilities, up to float rounding
    assert mode == "AdaptCLIP (2-shot)"
    assert score == pytest.approx(few.score, abs=1e-5)
    np.testing.assert_allclose(amap, few.map, atol=1e-5)
    np.testing.assert_array_equal(heat, heatmap_overlay(query, amap))

    # the cached head again, no references: zero-shot, whatever the object's name (AdaptCLIP says "object")
    _, score, amap, mode = app.anomaly_map(heads, query, "", method="AdaptCLIP")
    assert mode == "AdaptCLIP (zero-shot)"
    assert score == pytest.approx(zero.score, abs=1e-5)
    np.testing.assert_allclose(amap, zero.map, atol=1e-5)
    assert heads.adaptclip() is heads.adaptclip()
    assert len([key for key in heads._cache if key[0] == "adaptclip"]) == 1

    # WinCLIP stays the default
    assert app.anomaly_map(heads, query, "bottle")[3] == "WinCLIP (zero-shot)"


def test_anomaly_map_refusals(app, toy, tiny_backbone, head_file, images):
    query, references = images
    heads = app.Heads(toy, adaptclip_head=head_file)
    with pytest.raises(OvdenseError) as info:
        app.anomaly_map(heads, query, "bottle", [references[0], references[1][:32, :32]], method="AdaptCLIP")
    assert "the reference images have different sizes" in str(info.value)
    assert "give normal images of one size, the queries' size" in str(info.value)
    with pytest.raises(OvdenseError) as info:
        app.anomaly_map(heads, query[:32], "bottle", references, method="AdaptCLIP")
    assert str(info.value) == ("an image of 40x32 px against references of 40x48 px: AdaptCLIP's few-shot "
                               "comparison needs normal images of the queries' size")
    # a refused request leaves no references behind: the next one without them is zero-shot
    _, score, _, mode = app.anomaly_map(heads, query[:32], "bottle", method="AdaptCLIP")
    assert mode == "AdaptCLIP (zero-shot)"
    assert score == pytest.approx(_direct(toy, head_file, query[:32]).score, abs=1e-5)
    with pytest.raises(OvdenseError, match="unknown anomaly method 'PatchCore'; choose from: WinCLIP, Adapt"):
        app.anomaly_map(heads, query, "bottle", method="PatchCore")
    with pytest.raises(OvdenseError) as info:  # no adapters ship for a model but the toy
        app.anomaly_map(app.Heads(tiny_backbone), query, "bottle", method="AdaptCLIP")
    assert str(info.value).startswith("no AdaptCLIP adapters for tiny-vit.json: start the demo with "
                                      "--adaptclip-head PATH")
    assert "\n" not in str(info.value)


def test_the_toy_models_shipped_adapters_are_the_default(app, toy, head_file, images, tmp_path, monkeypatch):
    """Without ``adaptclip_head``, the toy's adapters (``ovdense/assets/adaptclip-toy-head.safetensors``)
    when they are there; else the one-line refusal. The assets folder is a temporary one here, so the
    test holds before and after the trained file ships."""
    from ovdense.anomaly import adaptclip

    monkeypatch.setattr(adaptclip, "ASSETS", tmp_path)
    assert app.Heads(toy).adaptclip_head is None
    with pytest.raises(OvdenseError, match="no AdaptCLIP adapters for toy: start the demo with --adaptclip"):
        app.anomaly_map(app.Heads(toy), images[0], "bottle", method="AdaptCLIP")
    shipped = shutil.copy(head_file, tmp_path / adaptclip.TOY_HEAD_FILE)
    heads = app.Heads(toy)
    assert Path(heads.adaptclip_head) == Path(shipped)
    _, score, _, _ = app.anomaly_map(heads, images[0], "bottle", method="AdaptCLIP")
    assert score == pytest.approx(_direct(toy, head_file, images[0]).score, abs=1e-5)


# --------------------------------------------------------------------------------------------
# The command line and the page


def test_demo_flag_and_refusal_of_a_wrong_head_before_serving(app, tmp_path, capsys):
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")
    assert app._parse_args(["--adaptclip-head", "a.safetensors"]).adaptclip_head == "a.safetensors"
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(b"not safetensors")
    assert app.main(["--model", "toy", "--adaptclip-head", str(bad), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdense demo: error: ") and len(err.strip().splitlines()) == 1, err


def _png(path: Path, rgb: np.ndarray) -> str:
    Image.fromarray(rgb).save(path)
    return str(path)


def test_the_tab_through_gradio_client(app, toy, head_file, images, tmp_path, monkeypatch):
    """``/anomaly`` of a page served on 127.0.0.1 with the method AdaptCLIP: the heat map it sends
    (a PNG) and the score it prints are ``AdaptClip.predict``'s, the status names the mode; references
    of mixed sizes answer the library's message, one line."""
    pytest.importorskip("gradio", reason="the [demo] extra is not installed")
    gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
    from gradio_client import handle_file

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    query, references = images
    files = [handle_file(_png(tmp_path / name, rgb)) for name, rgb in
             [("query.png", query), ("normal-1.png", references[0]), ("normal-2.png", references[1]),
              ("small.png", references[1][:32, :32])]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = app.build_app(toy, adaptclip_head=head_file)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                      download_files=str(tmp_path / "downloads"))
        wanted = {2: _direct(toy, head_file, query, references), 0: _direct(toy, head_file, query)}
        for shots, want in wanted.items():
            heat, status = client.predict(files[0], "bottle", files[1:1 + shots], "AdaptCLIP",
                                          api_name="/anomaly")
            mode = "AdaptCLIP (2-shot)" if shots else "AdaptCLIP (zero-shot)"
            assert status.startswith(f"**image score {want.score:.3f}** by {mode}"), status
            shown = np.asarray(Image.open(heat).convert("RGB")).astype(int)
            assert np.abs(shown - heatmap_overlay(query, want.map)).max() <= 1

        _, status = client.predict(files[0], "bottle", [], "WinCLIP", api_name="/anomaly")
        assert "by WinCLIP (zero-shot)" in status
        with pytest.raises(gradio_client.exceptions.AppError) as info:
            client.predict(files[0], "bottle", [files[1], files[3]], "AdaptCLIP", api_name="/anomaly")
        assert str(info.value).startswith("the reference images have different sizes")
        assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
    finally:
        page.close()
