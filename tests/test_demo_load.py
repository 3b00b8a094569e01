"""The demo under load: 20 concurrent sessions against a server started as a user starts it.

``python demo/app.py --model toy --queue-size 8`` serves on 127.0.0.1; 20 gradio_client sessions
(one ``Client`` each, so 20 session hashes) send a segment request at once through the page's
``/segment`` API. Every request must either succeed with the label map of ``Segmenter.predict``
(computed here on the same image, compared pixel for pixel: the page sends PNGs) or be told the
queue is full ("try again"); nothing else. The server's resident memory (``VmRSS`` of
``/proc/<pid>/status``) is sampled throughout and must stay within a fixed margin of its idle
size. A header bomb and an upload over the byte limit are refused with one line each, no stack
trace. Traffic goes to the loopback address only; the request count and every wait are bounded.

Skips where gradio or gradio_client is not installed (``pip install -e ".[demo]"``).
"""

import importlib.util
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdense import Segmenter, create_backbone
from ovdense.data.synthetic import SceneConfig, render_scene
from ovdense.io import colorize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_demo import _free_port, _wait_until_serving  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None or importlib.util.find_spec("gradio_client") is None,
    reason="gradio / gradio_client are not installed (pip install -e '.[demo]')",
)

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "demo" / "app.py"
SESSIONS = 20
QUEUE_SIZE = 8
RSS_MARGIN_MB = 600  # the server's growth over its idle size that counts as bounded
METHOD = "maskclip"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _header_bomb(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A valid PNG header claiming ``width × height`` RGB pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import subprocess

    folder = tmp_path_factory.mktemp("demo-load")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", OVDENSE_CACHE=str(folder / "cache"),
               GRADIO_TEMP_DIR=str(folder / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    log = folder / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(APP), "--model", "toy", "--port", str(port),
             "--queue-size", str(QUEUE_SIZE)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(process, url, log)
        yield process, url, folder, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _client(url: str, folder: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(folder), ssl_verify=False)


def test_twenty_concurrent_sessions(server, tmp_path, capsys):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    process, url, folder, log = server
    backbone = create_backbone("toy")
    scenes = [render_scene(seed, SceneConfig(size=(96, 128), objects=(2, 3))) for seed in range(4)]
    jobs = []
    for index in range(SESSIONS):
        scene = scenes[index % len(scenes)]
        path = tmp_path / f"scene{index}.png"
        Image.fromarray(scene.image).save(path)
        names = list(dict.fromkeys(["background"] + [o.colour + " " + o.shape for o in scene.objects]))
        jobs.append((path, names, scene.image))
    expected = [colorize(Segmenter(backbone, METHOD, names).predict(rgb).labels)
                for _, names, rgb in jobs[:len(scenes)]]  # job i shows scene i % len(scenes)
    clients = [_client(url, tmp_path / f"session{i}") for i in range(SESSIONS)]

    idle = _rss_mb(process.pid)
    peak = [idle]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb(process.pid))
            time.sleep(0.05)

    outcomes: list[tuple[str, str]] = [("", "")] * SESSIONS
    start = threading.Barrier(SESSIONS)

    def session(i: int) -> None:
        path, names, _ = jobs[i]
        start.wait(timeout=60)
        try:
            result = clients[i].predict(handle_file(str(path)), ", ".join(names), METHOD, 0.0,
                                        "method default", False, api_name="/segment")
        except QueueError as e:
            outcomes[i] = ("busy", str(e))
            return
        except (AppError, Exception) as e:  # noqa: BLE001 - recorded and failed below
            outcomes[i] = ("failed", f"{type(e).__name__}: {e}")
            return
        with Image.open(result[1]) as pil:
            shown = np.asarray(pil.convert("RGB"))
        want = expected[i % len(scenes)]
        same = shown.shape == want.shape and np.array_equal(shown, want)
        outcomes[i] = ("ok", "") if same else ("wrong", f"label map differs for {path.name}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(SESSIONS)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    seconds = time.perf_counter() - began
    stop.set()
    sampler.join(timeout=5)

    assert not any(t.is_alive() for t in threads), "a session did not finish within 240 s"
    kinds = [kind for kind, _ in outcomes]
    bad = [(i, o) for i, o in enumerate(outcomes) if o[0] not in ("ok", "busy")]
    assert not bad, f"{bad}\n{log.read_text()[-3000:]}"
    assert all("try again" in message for kind, message in outcomes if kind == "busy")
    assert kinds.count("ok") >= QUEUE_SIZE // 2, kinds  # the queue held and served requests
    assert peak[0] - idle < RSS_MARGIN_MB, f"the server grew from {idle:.0f} to {peak[0]:.0f} MB"
    assert "Traceback" not in log.read_text()
    with capsys.disabled():
        print(f"\ndemo load: {SESSIONS} sessions, {kinds.count('ok')} served, {kinds.count('busy')} told "
              f"to try again, {seconds:.1f} s, {kinds.count('ok') / seconds:.2f} requests/s; server RSS "
              f"idle {idle:.0f} MB, peak {peak[0]:.0f} MB")


def test_oversized_uploads_are_refused_in_one_line(server, tmp_path):
    from gradio_client import handle_file

    process, url, folder, log = server
    client = _client(url, tmp_path / "downloads")
    bomb = _header_bomb(tmp_path / "bomb.png")
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(bomb)), "a, b", METHOD, 0.0, "method default", False,
                       api_name="/segment")
    message = str(info.value)
    assert "bomb.png is 50000×50000" in message and "megapixels" in message, message
    assert "Traceback" not in message

    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # over the 25 MB upload limit: refused before it is stored
        f.write(b"\x89PNG" + os.urandom(1024) * (26 * 1024))
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(big)), "a, b", METHOD, 0.0, "method default", False,
                       api_name="/segment")
    assert "Traceback" not in str(info.value)
    assert "Traceback" not in log.read_text()
