"""A seeded fuzz suite over every input ovdense takes: image files, arrays, PIL images, class lists,
class files, checkpoints and (with mmengine) config overrides.

The rule under test (``ovdense.errors``): through the Python API each input is either processed
(where it is valid: the result is an RGB ``uint8 [H, W, 3]`` image of the expected size, or a
vocabulary) or refused with ``OvdenseError``; any other exception is a failure. Through one CLI
call over a folder of the image files: no traceback, every bad file named once in an
``ovdense: skipped:`` line, every valid one written, exit code 1.

The inputs are generated from ``SEED`` (random bytes; PNG, JPEG, TIFF, WebP and BMP encodings
truncated at random points or with random bits flipped; empty files; header bombs of every
format; odd but valid images: 1 × 1, 3 × 4000, 16-bit, CMYK, LA, palette with transparency,
EXIF-rotated, 1-bit, float TIFF). Each file has its own stem (the CLI refuses clashing output
names). A pickle whose ``__reduce__`` would create a marker file is
given as weights everywhere weights are read; the marker must never appear.

Each test feeds its inputs through ``feed``, which records them in ``FED`` as they go through the
API; the last test counts those records (what the tests ran, not what the generators could make).
"""

import io
import os
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense.backbone.prompts import Vocabulary
from ovdense.errors import OvdenseError
from ovdense.io import MAX_PIXELS, load_image

SEED = 17
PER_KIND = 160  # random-byte, truncated and bit-flipped files each
ARRAYS = 400
CLASS_LISTS = 300
FORMATS = {"png": "PNG", "jpg": "JPEG", "tif": "TIFF", "webp": "WEBP", "bmp": "BMP"}

IMAGE_FILES = "image files (random, empty, truncated, bit-flipped)"
BOMBS = "header bombs"
ODD = "odd valid images"
ARRAY_INPUTS = "arrays and other objects"
PIL_IMAGES = "PIL images"
CLASS_INPUTS = "class lists and class files"
CHECKPOINTS = "checkpoint files"
OVERRIDES = "config overrides"
CLI_FILES = "files in one CLI call"
#: kind → the inputs the tests below said they would feed (``promise``) and those they fed
#: through the API (``feed``), each by a name, filled as the tests run.
PROMISED: dict[str, set] = {}
FED: dict[str, set] = {}


def promise(kind: str, names) -> None:
    PROMISED.setdefault(kind, set()).update(names)


def feed(kind: str, name, call, *args, **kwargs):
    """``call(*args, **kwargs)`` (an API entry point given one input), recorded in ``FED`` as the
    input ``name`` of ``kind`` whether it returns or raises."""
    try:
        return call(*args, **kwargs)
    finally:
        FED.setdefault(kind, set()).add(name)


# --------------------------------------------------------------------------------------------
# Generators


def _encode(rgb: np.ndarray, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=FORMATS[fmt], **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_bombs() -> dict[str, bytes]:
    """Small files whose headers claim far more pixels than ``MAX_PIXELS``: PNG (50,000² and
    65,535 × 40,000), JPEG (SOF0 65,535²), BMP and TIFF. (libwebp checks a WebP header against
    its bitstream before Pillow sees the size, so a WebP bomb is a plain unreadable file.)"""
    bombs = {}
    for name, (w, h) in {"png_50k": (50_000, 50_000), "png_wide": (65_535, 40_000)}.items():
        header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        bombs[f"{name}.png"] = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    jpeg = bytearray(_encode(np.zeros((8, 8, 3), np.uint8), "jpg"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65_535, 65_535)
    bombs["jpeg_65k.jpg"] = bytes(jpeg)
    bmp = bytearray(_encode(np.zeros((2, 2, 3), np.uint8), "bmp"))
    bmp[18:26] = struct.pack("<ii", 40_000, 40_000)
    bombs["bmp_40k.bmp"] = bytes(bmp)
    tif = Image.new("L", (1, 1))
    buffer = io.BytesIO()
    tif.save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        tag, typ = struct.unpack("<HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = struct.pack("<H", 60_000) + b"\0\0" if typ == 3 else struct.pack("<I", 60_000)
            data[entry + 8:entry + 12] = value
    bombs["tiff_60k.tif"] = bytes(data)
    return bombs


def valid_odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Valid images of unusual kinds, written to ``folder``; name → expected ``(H, W)``."""
    rng = np.random.default_rng(SEED)
    expected = {}

    def save(name: str, pil: Image.Image, shape: tuple[int, int], **params) -> None:
        pil.save(folder / name, **params)
        expected[name] = shape

    save("one_pixel.png", Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)), (1, 1))
    save("thin.png", Image.fromarray(rng.integers(0, 256, (3, 4000, 3), dtype=np.uint8)), (3, 4000))
    save("tall.jpg", Image.fromarray(rng.integers(0, 256, (4000, 3, 3), dtype=np.uint8)), (4000, 3))
    save("sixteen.png", Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)), (9, 7))
    cmyk = Image.fromarray(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), mode="CMYK")
    save("cmyk_jpeg.jpg", cmyk, (6, 5))
    save("cmyk_tiff.tif", cmyk, (6, 5))
    save("la.png", Image.fromarray(rng.integers(0, 256, (5, 6, 2), dtype=np.uint8), mode="LA"), (5, 6))
    palette = Image.fromarray(rng.integers(0, 4, (7, 8), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    save("palette_transparent.png", palette, (7, 8), transparency=1)
    save("palette.bmp", palette, (7, 8))
    save("bilevel.png", Image.fromarray(rng.integers(0, 2, (5, 9), dtype=bool)), (5, 9))
    save("float.tif", Image.fromarray(rng.random((4, 6), dtype=np.float32)), (4, 6))
    save("rgba.webp", Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), mode="RGBA"), (8, 8),
         lossless=True)
    rotated = Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save("exif_rotated.jpg", rotated, (20, 10), exif=exif.tobytes())
    return expected


def corrupt_files(rng: np.random.Generator, folder: Path, per_kind: int) -> list[str]:
    """Random bytes, empty files, truncated and bit-flipped encodings of every format."""
    names = []
    for i in range(per_kind):
        ext = list(FORMATS)[i % len(FORMATS)]
        (folder / f"random{i:04d}.{ext}").write_bytes(rng.bytes(int(rng.integers(1, 3000))))
        names.append(f"random{i:04d}.{ext}")
    for ext in FORMATS:
        (folder / f"empty_{ext}.{ext}").write_bytes(b"")
        names.append(f"empty_{ext}.{ext}")
    sources = {ext: _encode(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), ext) for ext in FORMATS}
    for i in range(per_kind):
        ext = list(FORMATS)[i % len(FORMATS)]
        data = sources[ext]
        (folder / f"truncated{i:04d}.{ext}").write_bytes(data[: int(rng.integers(1, len(data)))])
        names.append(f"truncated{i:04d}.{ext}")
    for i in range(per_kind):
        ext = list(FORMATS)[i % len(FORMATS)]
        data = bytearray(sources[ext])
        for _ in range(int(rng.integers(1, 8))):
            position = int(rng.integers(0, len(data)))
            data[position] ^= 1 << int(rng.integers(0, 8))
        (folder / f"flipped{i:04d}.{ext}").write_bytes(bytes(data))
        names.append(f"flipped{i:04d}.{ext}")
    return names


def _check_image(result: np.ndarray) -> None:
    assert isinstance(result, np.ndarray) and result.dtype == np.uint8
    assert result.ndim == 3 and result.shape[2] == 3 and result.shape[0] > 0 and result.shape[1] > 0
    assert result.flags.c_contiguous


# --------------------------------------------------------------------------------------------
# Image files through the API


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-images")
    rng = np.random.default_rng(SEED)
    corrupt = corrupt_files(rng, folder, per_kind=PER_KIND)
    for name, data in header_bombs().items():
        (folder / name).write_bytes(data)
    expected = valid_odd_images(folder)
    return folder, corrupt, list(header_bombs()), expected


def test_image_files_are_read_or_refused(image_folder):
    folder, corrupt, bombs, expected = image_folder
    promise(IMAGE_FILES, corrupt)
    promise(BOMBS, bombs)
    promise(ODD, expected)
    start = time.perf_counter()
    refused = read = 0
    for name in corrupt:
        try:
            _check_image(feed(IMAGE_FILES, name, load_image, folder / name))
            read += 1  # a flipped bit in pixel data can still decode: a valid, different image
        except OvdenseError as e:
            assert name in str(e) and "\n" not in str(e)
            refused += 1
    for name in bombs:
        pattern = rf"{name} is \d+×\d+ = [\d.]+ megapixels, over the limit of 100 megapixels"
        with pytest.raises(OvdenseError, match=pattern):
            feed(BOMBS, name, load_image, folder / name)
    for name, shape in expected.items():
        result = feed(ODD, name, load_image, folder / name)
        _check_image(result)
        assert result.shape[:2] == shape, name
    assert refused > len(corrupt) // 2 and time.perf_counter() - start < 60


def test_bombs_are_refused_without_decoding_and_pillow_says_nothing(image_folder, recwarn):
    folder, _, bombs, _ = image_folder
    before = Image.MAX_IMAGE_PIXELS
    promise(BOMBS, [*bombs, "mid.png"])
    for name in bombs:
        start = time.perf_counter()
        with pytest.raises(OvdenseError, match="megapixels"):
            feed(BOMBS, name, load_image, folder / name)
        assert time.perf_counter() - start < 0.5, f"{name} took long: was it decoded?"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's own limit is left as it was
    # above Pillow's own warning level (89 MP) but under ours: read, no warning escapes
    header = struct.pack(">IIBBBBB", 9_500, 9_500, 8, 0, 0, 0, 0)
    mid = folder / "mid.png"
    mid.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                    + _png_chunk(b"IDAT", zlib.compress(b"\0" * 9_501 * 9_500)) + _png_chunk(b"IEND", b""))
    assert feed(BOMBS, "mid.png", load_image, mid).shape == (9_500, 9_500, 3)
    with pytest.raises(OvdenseError, match="90.2 megapixels, over the limit of 90"):
        feed(BOMBS, "mid.png", load_image, mid, max_pixels=90_000_000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --------------------------------------------------------------------------------------------
# Arrays and PIL images through the API


def _arrays(rng: np.random.Generator, n: int):
    dtypes = [np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.float16, np.int8,
              np.uint32, np.bool_, np.complex64, object]
    for _ in range(n):
        ndim = int(rng.integers(0, 5))
        shape = tuple(int(rng.choice([0, 1, 2, 3, 4, 5, 7])) for _ in range(ndim))
        dtype = dtypes[int(rng.integers(0, len(dtypes)))]
        if dtype is object:
            yield np.empty(shape, dtype=object)
            continue
        values = rng.normal(0.5, 1.0, size=shape) * float(rng.choice([1, 255, 70000]))
        with np.errstate(invalid="ignore", over="ignore"):  # out-of-range casts are part of the fuzz
            array = values.astype(dtype) if dtype is not np.bool_ else values > 0
        if np.issubdtype(array.dtype, np.floating) and array.size and rng.random() < 0.5:
            array.flat[int(rng.integers(0, array.size))] = rng.choice([np.nan, np.inf, -np.inf])
        yield array


BAD_ARRAYS = (np.full((3, 3, 3), np.nan, np.float32), np.full((2, 2), np.inf), np.zeros((4, 4, 3, 1)),
              np.zeros((2, 2, 2), np.uint8), np.zeros((0, 0, 3), np.uint8), np.array(5))
NOT_IMAGES = (None, 3, "", b"\x89PNG", [[1, 2], [3, 4]])
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "I;16", "RGBX",
         "La", "RGBa"]


def test_arrays_are_converted_or_refused():
    rng = np.random.default_rng(SEED)
    promise(ARRAY_INPUTS, [("random", i) for i in range(ARRAYS)])
    promise(ARRAY_INPUTS, [("bad", i) for i in range(len(BAD_ARRAYS))])
    promise(ARRAY_INPUTS, [("not an image", i) for i in range(len(NOT_IMAGES))])
    converted = 0
    for i, array in enumerate(_arrays(rng, ARRAYS)):
        try:
            result = feed(ARRAY_INPUTS, ("random", i), load_image, array)
        except OvdenseError:
            continue
        _check_image(result)
        assert result.shape[:2] == array.shape[:2]
        converted += 1
    for i, array in enumerate(BAD_ARRAYS):
        with pytest.raises(OvdenseError):
            feed(ARRAY_INPUTS, ("bad", i), load_image, array)
    for i, value in enumerate(NOT_IMAGES):
        with pytest.raises(OvdenseError):
            feed(ARRAY_INPUTS, ("not an image", i), load_image, value)
    assert converted > 0


@pytest.mark.parametrize("mode", MODES)
def test_pil_images_of_every_mode(mode):
    promise(PIL_IMAGES, [mode])
    pil = Image.new(mode, (5, 3))
    try:
        result = feed(PIL_IMAGES, mode, load_image, pil)
    except OvdenseError as e:
        assert mode in str(e)
    else:
        _check_image(result)
        assert result.shape == (3, 5, 3)
    with pytest.raises(OvdenseError, match="over the limit"):
        feed(PIL_IMAGES, mode, load_image, pil, max_pixels=14)


# --------------------------------------------------------------------------------------------
# Class lists and class files


def _random_word(rng: np.random.Generator) -> str:
    alphabet = "abc xyz,|\t\n\x00é漢🙂-_'\"{}"
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(0, 12))))


def _class_cases() -> list:
    return [[], [""], [" ", "\t", ","], ["cat", "cat"], ["cat", ["dog", "puppy"], ("cat",)],
            [f"class {i}" for i in range(10_000)], [None], [3, "dog"], ["ok", ["", " "]], None, 7,
            "cat,dog", iter(["cat", "dog"])]


CLASS_FILES = {"latin1.txt": "café\nthé\n".encode("latin-1"), "utf16.txt": "cat\ndog\n".encode("utf-16"),
               "binary.txt": bytes(range(256)), "empty.txt": b"", "blank.txt": b"\n \n\t\n# only a comment\n",
               "nul.txt": b"cat\x00dog\n", "ok.txt": b"cat\ndog, puppy\n"}


def test_class_lists_are_parsed_or_refused(tmp_path):
    rng = np.random.default_rng(SEED)
    cases = _class_cases()
    cases += [[_random_word(rng) for _ in range(int(rng.integers(0, 6)))] for _ in range(CLASS_LISTS)]
    promise(CLASS_INPUTS, [("list", i) for i in range(len(cases))] + list(CLASS_FILES) + ["a folder"])
    for i, classes in enumerate(cases):
        try:
            vocabulary = feed(CLASS_INPUTS, ("list", i), Vocabulary.parse, classes)
        except OvdenseError:
            continue
        assert len(vocabulary.names) >= 1 and all(w.strip() == w and w for w in vocabulary.prompts)
        assert len(vocabulary.prompts) == len(vocabulary.class_of_prompt)
    assert len(Vocabulary.parse(["cat", "cat"]).names) == 2  # duplicates are kept (ADE-847 has some)
    assert len(Vocabulary.parse([f"class {i}" for i in range(10_000)])) == 10_000
    for name, data in CLASS_FILES.items():
        (tmp_path / name).write_bytes(data)
        try:
            feed(CLASS_INPUTS, name, Vocabulary.from_file, tmp_path / name)
        except OvdenseError as e:
            assert name in str(e)
    with pytest.raises(OvdenseError, match="not UTF-8"):
        Vocabulary.from_file(tmp_path / "latin1.txt")
    with pytest.raises(OvdenseError, match="is a folder"):
        feed(CLASS_INPUTS, "a folder", Vocabulary.from_file, tmp_path)


def test_a_thousand_classes_segment(tiny_backbone):
    """A long vocabulary runs end to end (10,000 are parsed above; encoding them costs ~15 s of
    text-cache writes here, one file per word)."""
    from ovdense import Segmenter

    segmenter = Segmenter(tiny_backbone, "maskclip", [f"c{i}" for i in range(1_000)], templates="single",
                          short_side=32, window=(32, 16))
    labels = segmenter.predict(np.zeros((16, 16, 3), np.uint8)).labels
    assert labels.shape == (16, 16) and labels.max() < 1_000


# --------------------------------------------------------------------------------------------
# Checkpoints


class _Marker:
    """Unpickling this creates ``path``: the proof that a pickle's code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _checkpoints(folder: Path, good: dict, marker: Path) -> dict[str, bool]:
    """Weight files, each mapped to whether it is valid for the model of ``good``."""
    rng = np.random.default_rng(SEED)
    files = {}
    for protocol in (2, 4):
        path = folder / f"code_p{protocol}.pt"
        path.write_bytes(pickle.dumps({"state_dict": _Marker(str(marker))}, protocol=protocol))
        files[path.name] = False
    torch.save({"x": _Marker(str(marker))} | good, folder / "code_in_zip.pt")
    files["code_in_zip.pt"] = False
    torch.save(good, folder / "good.pt")
    files["good.pt"] = True
    data = (folder / "good.pt").read_bytes()
    for i, cut in enumerate(rng.integers(1, len(data), size=6)):
        (folder / f"truncated{i}.pt").write_bytes(data[:int(cut)])
        files[f"truncated{i}.pt"] = False
    from safetensors.torch import save_file

    save_file(good, str(folder / "good.safetensors"))
    files["good.safetensors"] = True
    data = (folder / "good.safetensors").read_bytes()
    for i, cut in enumerate(rng.integers(1, len(data), size=6)):
        (folder / f"truncated{i}.safetensors").write_bytes(data[:int(cut)])
        files[f"truncated{i}.safetensors"] = False
    wrong = dict(good)
    key = next(k for k, v in good.items() if v.ndim == 2)
    wrong[key] = torch.zeros(good[key].shape[0] + 1, good[key].shape[1])
    torch.save(wrong, folder / "wrong_shape.pt")
    save_file(wrong, str(folder / "wrong_shape.safetensors"))
    torch.save({k: v for k, v in good.items() if k != key}, folder / "missing_key.pt")
    torch.save(good | {"extra.weight": torch.zeros(1)}, folder / "extra_key.pt")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    for name in ("wrong_shape.pt", "wrong_shape.safetensors", "missing_key.pt", "extra_key.pt", "tensor.pt",
                 "list.pt"):
        files[name] = False
    for name, data in {"empty.pt": b"", "random.pt": rng.bytes(512), "text.pt": b"hello",
                       "random.safetensors": rng.bytes(512), "json.safetensors": b'{"a": 1}'}.items():
        (folder / name).write_bytes(data)
        files[name] = False
    return files


def test_checkpoints_load_or_are_refused_and_never_run_code(tiny_config_path, tmp_path, recwarn):
    from ovdense import create_backbone

    state = create_backbone(str(tiny_config_path)).model.state_dict()
    good = {k: v.contiguous().clone() for k, v in state.items()}
    marker = tmp_path / "code-ran"
    files = _checkpoints(tmp_path, good, marker)
    promise(CHECKPOINTS, files)
    for name, valid in files.items():
        weights = str(tmp_path / name)
        if valid:
            backbone = feed(CHECKPOINTS, name, create_backbone, str(tiny_config_path), pretrained=weights)
            assert all(torch.equal(v, good[k]) for k, v in backbone.model.state_dict().items())
        else:
            with pytest.raises(OvdenseError, match=name.replace(".", r"\.")):
                feed(CHECKPOINTS, name, create_backbone, str(tiny_config_path), pretrained=weights)
        assert not marker.exists(), f"{name}: the pickle's code ran"


def test_non_tensor_values_in_a_checkpoint(tiny_config_path, tmp_path):
    from ovdense import create_backbone

    good = create_backbone(str(tiny_config_path)).model.state_dict()
    torch.save({k: 3 for k in good}, tmp_path / "ints.pt")  # weights_only allows ints
    promise(CHECKPOINTS, ["ints.pt"])
    with pytest.raises(OvdenseError, match="holds a int, not a tensor"):
        feed(CHECKPOINTS, "ints.pt", create_backbone, str(tiny_config_path),
             pretrained=str(tmp_path / "ints.pt"))


def test_sam_checkpoint_with_code_never_runs_it_nor_advises_unpickling(tmp_path):
    pytest.importorskip("segment_anything", reason="segment-anything is not installed (the [sam] extra)")
    from ovdense.heads.sam_clip import load_sam

    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    promise(CHECKPOINTS, ["sam pickle p2", "sam pickle p4", "sam empty"])
    for protocol in (2, 4):
        checkpoint.write_bytes(pickle.dumps({"image_encoder.x": _Marker(str(marker))}, protocol=protocol))
        with pytest.raises(OvdenseError) as info:
            feed(CHECKPOINTS, f"sam pickle p{protocol}", load_sam, checkpoint)
        message = str(info.value)
        assert "sam_vit_b_01ec64.pth" in message and "vit_b" in message
        assert "weights_only" not in message and "safe_globals" not in message
        assert not marker.exists()
    checkpoint.write_bytes(b"")
    with pytest.raises(OvdenseError, match="is empty"):
        feed(CHECKPOINTS, "sam empty", load_sam, checkpoint)


# --------------------------------------------------------------------------------------------
# mm config overrides


def test_mm_segmentor_with_unknown_option(tmp_path):
    """A config override naming an option the Segmenter does not have is refused, naming it
    (built through mmseg's registry, as tools/test.py builds a config's model)."""
    pytest.importorskip("mmengine", reason="mmengine is not installed (the [mm] extra)")
    try:
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS

        import ovdense.mm  # noqa: F401  (registers OvdenseSegmentor)
    except ImportError as e:
        pytest.skip(f"the OpenMMLab layer does not import here: {e}")
    import json

    from conftest import TINY_CONFIG

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    init_default_scope("mmseg")
    promise(OVERRIDES, ["no_such_option"])
    # TypeError is what mmengine's registry re-raises today; the mm layer's owner may make it OvdenseError
    with pytest.raises((OvdenseError, TypeError)) as info:
        feed(OVERRIDES, "no_such_option", MODELS.build,
             dict(type="OvdenseSegmentor", backbone=dict(name=str(config)), method="maskclip",
                  classnames=["a", "b"], no_such_option=3))
    assert "no_such_option" in str(info.value)


# --------------------------------------------------------------------------------------------
# The same files through one CLI call


def test_one_cli_call_over_the_fuzz_folder(image_folder, tiny_config_path, tmp_path, capsys, monkeypatch):
    from ovdense.cli import main
    from ovdense.io import list_images

    source, corrupt, bombs, expected = image_folder
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "in"  # every 6th corrupt file (of each kind), every bomb, every odd valid image
    folder.mkdir()
    names = corrupt[::6] + bombs + list(expected)
    promise(CLI_FILES, names)
    for name in names:
        (folder / name).symlink_to(source / name)
    readable = set()
    for path in list_images([folder]):
        try:
            load_image(path)
            readable.add(path.stem)
        except OvdenseError:
            pass
    out = tmp_path / "out"
    code = main(["segment", str(folder), "--classes", "a,b", "--model", str(tiny_config_path),
                 "--pretrained", "none", "--templates", "single", "--short-side", "32",
                 "--window", "32", "16", "--method", "maskclip", "--out", str(out)])
    FED.setdefault(CLI_FILES, set()).update(p.name for p in list_images([folder]))  # what the call listed
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    skipped = [line for line in err.splitlines() if "ovdense: skipped:" in line]
    images = list_images([folder])
    bad = [p for p in images if p.stem not in readable]
    assert len(skipped) == len(bad)
    for path in bad:
        assert sum(path.name in line for line in skipped) == 1, path.name
    assert sorted(p.name for p in out.glob("*.json")) == sorted(f"{s}.json" for s in readable)
    assert f"{len(bad)} of {len(images)} images failed" in err


def test_pixel_limit_is_the_documented_default():
    assert MAX_PIXELS == 100_000_000
    from ovdense import cli

    assert cli.MAX_PIXELS == MAX_PIXELS  # the CLI's default, spelled out there to stay import-light


#: the tests that feed inputs: the count needs them all run before it
FEEDERS = (
    "test_image_files_are_read_or_refused",
    "test_bombs_are_refused_without_decoding_and_pillow_says_nothing",
    "test_arrays_are_converted_or_refused",
    "test_pil_images_of_every_mode",
    "test_class_lists_are_parsed_or_refused",
    "test_checkpoints_load_or_are_refused_and_never_run_code",
    "test_non_tensor_values_in_a_checkpoint",
    "test_sam_checkpoint_with_code_never_runs_it_nor_advises_unpickling",
    "test_mm_segmentor_with_unknown_option",
    "test_one_cli_call_over_the_fuzz_folder",
)
API_KINDS = (IMAGE_FILES, BOMBS, ODD, ARRAY_INPUTS, PIL_IMAGES, CLASS_INPUTS, CHECKPOINTS, OVERRIDES)


def test_the_suite_holds_a_thousand_inputs(request, capsys):
    """Counts the inputs the tests above fed through the API in this session (``FED``), by kind:
    at least a thousand, and every input each test promised (those of a test that was skipped
    before it promised any are not counted). Skipped when some of those tests were not selected
    to run before this one (``-k``): it counts what ran."""
    items = [item for item in request.session.items if item.path == request.path]
    order = [item.originalname for item in items]
    here = order.index(request.function.__name__)
    absent = [name for name in FEEDERS if name not in order[:here]]
    if absent:
        pytest.skip(f"counts the inputs of the whole file; not run before it: {', '.join(absent)}")
    unfed = {kind: sorted(map(str, PROMISED[kind] - FED.get(kind, set())))[:5] for kind in PROMISED
             if PROMISED[kind] - FED.get(kind, set())}
    assert not unfed, f"inputs promised but never fed through the API: {unfed}"
    counts = {kind: len(FED.get(kind, ())) for kind in API_KINDS}
    total = sum(counts.values())
    assert total >= 1_000, counts
    with capsys.disabled():
        print(f"\nfuzz: {total} inputs through the API (" + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"); {len(FED.get(CLI_FILES, ()))} files in one CLI call")
