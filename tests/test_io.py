"""Image loading rules and atomic, readable outputs."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ovdense.errors import OvdenseError
from ovdense.io import list_images, load_image, overlay, palette, write_json, write_label_png


def test_rgb_paths_pil_and_arrays_agree(tmp_path, rng):
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb):
        np.testing.assert_array_equal(load_image(source), rgb)


def test_grayscale_is_replicated(tmp_path, rng):
    gray = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_sixteen_bit_is_scaled_to_full_range(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    out = load_image(tmp_path / "d.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])
    np.testing.assert_array_equal(load_image(values)[0, :, 1], [0, 1, 255, 128])


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 0, 0, 0], [200, 0, 0, 255], [200, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [200, 0, 0])
    a = 128 / 255
    np.testing.assert_allclose(out[0, 2], [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)], atol=1)


def test_float_image_in_unit_range():
    out = load_image(np.full((2, 2, 3), 0.5))
    assert out.dtype == np.uint8 and (out == 128).all()
    with pytest.raises(OvdenseError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2, 3), 2.0))


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.png", "image not found"),
    (lambda p: (p / "bad.png").write_text("not an image") and p / "bad.png", "cannot read image"),
])
def test_bad_files_name_the_problem(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(OvdenseError, match=message) as info:
        load_image(path)
    assert path.name in str(info.value)


def test_bad_arrays():
    with pytest.raises(OvdenseError, match="shape"):
        load_image(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(OvdenseError, match="empty"):
        load_image(np.zeros((0, 3, 3), np.uint8))


def test_label_png_round_trip_with_palette(tmp_path, rng):
    labels = rng.integers(0, 30, size=(9, 11))
    write_label_png(tmp_path / "l.png", labels)
    with Image.open(tmp_path / "l.png") as pil:
        assert pil.mode == "P"
        np.testing.assert_array_equal(np.asarray(pil), labels)
        np.testing.assert_array_equal(np.array(pil.getpalette()).reshape(-1, 3)[:30], palette(30))


def test_label_png_beyond_255_classes_is_16_bit(tmp_path):
    labels = np.array([[0, 300], [846, 5]])
    write_label_png(tmp_path / "l.png", labels)
    with Image.open(tmp_path / "l.png") as pil:
        np.testing.assert_array_equal(np.asarray(pil), labels)


def test_voc_palette():
    np.testing.assert_array_equal(palette(4), [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
    assert palette(256)[255].tolist() == [224, 224, 192]


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    write_json(tmp_path / "out" / "r.json", {"a": 1})
    write_json(tmp_path / "out" / "r.json", {"a": 2})
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path / "out") == ["r.json"]


def test_overlay_blends_and_adds_legend(rng):
    image = np.full((60, 30, 3), 100, np.uint8)
    labels = np.zeros((60, 30), int)
    labels[:, 15:] = 2
    out = overlay(image, labels, ["bg", "cat", "dog"], alpha=0.5)
    assert out.shape == (60, 230, 3)
    np.testing.assert_array_equal(out[0, 20], np.round(0.5 * 100 + 0.5 * palette(3)[2]).astype(np.uint8))
    legend = out[:, 30:].reshape(-1, 3)
    swatches = {tuple(c) for c in legend.tolist()}
    assert tuple(palette(3)[2]) in swatches and tuple(palette(3)[1]) not in swatches  # present only


def test_list_images_expands_folders(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "b.jpg"]


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width × height`` RGB pixels, with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_pixel_limit_from_the_header(tmp_path, rng, recwarn):
    from ovdense.io import MAX_PIXELS, image_size

    bomb = _png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    assert image_size(bomb) == (50_000, 50_000)
    with pytest.raises(OvdenseError) as info:
        load_image(bomb)
    assert str(info.value) == (f"{bomb} is 50000×50000 = 2500.0 megapixels, over the limit of "
                               f"{MAX_PIXELS // 1_000_000} megapixels; downscale it or raise the limit "
                               "(--max-pixels)")
    assert not recwarn.list  # neither Pillow's DecompressionBombWarning nor anything else
    rgb = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", max_pixels=42), rgb)  # inclusive
    with pytest.raises(OvdenseError, match="a.png is 7×6"):
        load_image(tmp_path / "a.png", max_pixels=41)
    with pytest.raises(OvdenseError, match="the PIL image is 7×6"):
        load_image(Image.fromarray(rgb), max_pixels=41)
    np.testing.assert_array_equal(load_image(rgb, max_pixels=1), rgb)  # an array is already decoded
    with pytest.raises(OvdenseError, match="cannot read image"):  # no limit: decoded, and it is truncated
        load_image(_png_header_only(tmp_path / "small_bomb.png", 3_000, 3_000), max_pixels=None)


def test_cache_writes_skip_fsync_but_stay_atomic(tmp_path, monkeypatch):
    from ovdense.io import write_bytes

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    write_bytes(tmp_path / "x.bin", b"1", durable=False)
    assert synced == []
    write_bytes(tmp_path / "x.bin", b"2")
    assert len(synced) == 1 and (tmp_path / "x.bin").read_bytes() == b"2"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_overlay_of_more_than_256_classes():
    """Labels above 255 (ADE-847) blend and appear in the legend with the palette's colour of
    ``label % 256``."""
    labels = np.full((20, 30), 300)
    labels[:, :10] = 2
    out = overlay(np.zeros((20, 30, 3), np.uint8), labels, [f"c{i}" for i in range(301)], alpha=1.0)
    np.testing.assert_array_equal(out[0, 20], palette(256)[300 % 256])
    swatches = {tuple(c) for c in out[:, 30:].reshape(-1, 3).tolist()}
    assert tuple(palette(256)[300 % 256]) in swatches and tuple(palette(3)[2]) in swatches


def test_written_files_get_the_permissions_open_gives(tmp_path):
    """Atomic writes go through mkstemp (owner-only 0600); the result must be readable as a file
    written with open() would be (0666 less the umask), under two different umasks."""
    import os
    import stat

    from ovdense.io import write_bytes

    old = os.umask(0o022)
    try:
        for mask in (0o022, 0o077):
            os.umask(mask)
            plain, atomic = tmp_path / f"plain{mask}", tmp_path / f"atomic{mask}"
            plain.write_bytes(b"x")
            write_bytes(atomic, b"x")
            assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), oct(mask)
    finally:
        os.umask(old)


class _RunsCode:
    """A pickle that would run a shell command when unpickled by plain pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_read_checkpoint_never_runs_a_files_code(tmp_path):
    """``read_checkpoint``: mmengine's HistoryBuffers become inert placeholders, tensors load; an object
    outside that list (here ``os.system``) is refused and does not run, on the first or second try."""
    import pickle

    import torch

    from ovdense.io import Placeholder, read_checkpoint

    HistoryBuffer = pytest.importorskip("mmengine.logging", reason="needs mmengine").HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(1.5)
    torch.save({"state_dict": {"w": torch.ones(2)}, "message_hub": {"loss": buffer}}, tmp_path / "ok.pth")
    loaded = read_checkpoint(tmp_path / "ok.pth")
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert isinstance(loaded["message_hub"]["loss"], Placeholder)
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _RunsCode(marker)}, tmp_path / "bad.pth")
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        read_checkpoint(tmp_path / "bad.pth")
    assert not marker.exists()
