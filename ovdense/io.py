"""Image input and result output: the one image loader, the one palette, the one file writer.

Input rule (``load_image``) — every image becomes an RGB ``uint8`` array ``[H, W, 3]``:

* a path is opened with Pillow (EXIF orientation applied);
* grayscale (``L``, ``I;16``, ``I``, ``F``) is replicated to three channels;
* 16-bit data (PNG ``I;16`` or a ``uint16`` array) is scaled to 8 bit by ``v * 255 / 65535``
  rounded, i.e. the full 16-bit range maps to the full 8-bit range;
* palette images are expanded to RGB;
* an alpha channel (``RGBA``, ``LA``, ``PA``) is composited over white, so transparent areas
  look as they do in a viewer, not black;
* float arrays must be in ``[0, 1]`` and are scaled to 8 bit.

Pixel limit (``MAX_PIXELS``, 100 megapixels; ``max_pixels=`` of ``load_image``, ``--max-pixels``
of every CLI command): a file or PIL image with more pixels is refused with one ``OvdenseError``
naming the file, its size and the limit, checked from the header before anything is decoded, so a
"decompression bomb" (a small file whose header claims 50,000 × 50,000 pixels) costs nothing.
Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``) is left as Pillow sets it: its warning never
reaches the user, and a file it refuses is measured again without it (header only) and refused
by this rule. An array is already decoded and is taken as it is. Any file Pillow cannot decode
(truncated, corrupt, empty, random bytes, an unsupported mode) is one ``OvdenseError``.

Output: every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a crash never leaves a half-written result. The CLI names outputs
``<stem>_labels.png`` etc. and refuses an output path that is one of its inputs.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from ovdense.errors import OvdenseError

ImageInput = str | os.PathLike | Image.Image | np.ndarray

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 100_000_000  # the default pixel limit of every way an image enters ovdense
ORIENTATION = 0x0112  # the EXIF tag


def load_image(image: ImageInput, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Return ``image`` as an RGB ``uint8`` array ``[H, W, 3]`` by the rule in the module doc.

    Args:
        image: a path, a PIL image or an array.
        max_pixels: refuse a file or PIL image with more pixels than this (``None``: no limit),
            from its header, before decoding.
    Raises:
        OvdenseError: the file is missing, not a readable image or over the pixel limit, or the
            array has a shape or dtype that is not an image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise OvdenseError(f"image not found: {path}")
        try:
            with _open_image(path) as opened, warnings.catch_warnings():
                # Pillow's notes on damaged metadata ("Corrupt EXIF data", "Truncated File Read"):
                # the file either decodes or is refused below, in one line
                warnings.simplefilter("ignore")
                check_pixels(opened.size, max_pixels, path)
                opened.load()
                if opened.getexif().get(ORIENTATION, 1) in (1, None):  # nothing to turn: no copy
                    return _pil_to_rgb(opened)
                return _pil_to_rgb(ImageOps.exif_transpose(opened))
        except OvdenseError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise OvdenseError(f"cannot read image {path}: {_one_line(e)}") from e
        except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere in a decoder
            raise OvdenseError(f"cannot read image {path}: {type(e).__name__}: {_one_line(e)}") from e
    if isinstance(image, Image.Image):
        check_pixels(image.size, max_pixels, "the PIL image")
        try:
            return _pil_to_rgb(image)
        except (OSError, ValueError) as e:
            raise OvdenseError(f"cannot convert the PIL image (mode {image.mode}): {_one_line(e)}") from e
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise OvdenseError(
        f"an image must be a path, a PIL image or a numpy array, not {type(image).__name__}"
    )


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header alone (nothing is decoded).

    Raises:
        OvdenseError: the file is missing or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"image not found: {path}")
    try:
        with _open_image(path) as opened:
            return opened.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise OvdenseError(f"cannot read image {path}: {_one_line(e)}") from e


def check_pixels(size: tuple[int, int], max_pixels: int | None, name: str | os.PathLike) -> None:
    """Refuse an image of ``size = (width, height)`` with more than ``max_pixels`` pixels.

    Raises:
        OvdenseError: one line naming ``name``, the size and the limit.
    """
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise OvdenseError(
            f"{name} is {width}×{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels; downscale it or raise the limit (--max-pixels)"
        )


_UNCHECKED_OPEN = threading.Lock()


def _open_image(path: Path) -> Image.Image:
    """``Image.open`` (header only) without Pillow's warnings; a file Pillow refuses as a
    bomb is opened again with its check off, so the caller's own limit decides and can name the
    size. The check is off only while that header is read, under a lock."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bomb warning and notes on damaged headers
            return Image.open(path)
    except Image.DecompressionBombError:
        with _UNCHECKED_OPEN:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _pil_to_rgb(pil: Image.Image) -> np.ndarray:
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(pil))
    if pil.mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    if pil.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", pil.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(background, pil.convert("RGBA"))
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    return np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise OvdenseError(
            f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise OvdenseError(f"the image is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = np.round(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif array.dtype in (np.int32, np.int64):
        if array.min() < 0 or array.max() > 65535:
            raise OvdenseError("an integer image must hold values in [0, 65535]")
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        array = np.round(array.astype(np.float64) * scale).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise OvdenseError("a float image must hold finite values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise OvdenseError(f"unsupported image dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float64) / 255.0
        rgb = array[:, :, :3].astype(np.float64) * alpha + 255.0 * (1.0 - alpha)
        array = np.round(rgb).astype(np.uint8)
    return np.ascontiguousarray(array)


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of image paths (folders: one level deep)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Palette


def palette(num_colors: int = 256) -> np.ndarray:
    """The one ovdense palette: ``[num_colors, 3]`` ``uint8``, index 0 black.

    It is the PASCAL VOC colour map (the bits of the index spread over the three channels, most
    significant first), so a label PNG looks like the VOC and mmseg ones.
    """
    colors = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colors[index] = (r, g, b)
    return colors


def colorize(labels: np.ndarray) -> np.ndarray:
    """Map ``labels[H, W]`` (int) to ``[H, W, 3]`` ``uint8`` colours of the palette."""
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("labels must lie in [0, 255] to be coloured by the palette")
    return palette()[labels]


# --------------------------------------------------------------------------------------------
# Atomic writing


def _umask() -> int:
    """The process's umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    ``durable`` also flushes the file to disk before the rename (``fsync``), so a power cut
    leaves the old file or the new one; caches, which check what they read, skip it. The file
    gets the permissions ``open()`` would give it (``0o666`` less the umask), not the owner-only
    ``0o600`` of ``mkstemp``'s temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def _encode_pil(pil: Image.Image, format: str, **params: Any) -> bytes:
    import io as _io

    buffer = _io.BytesIO()
    pil.save(buffer, format=format, **params)
    return buffer.getvalue()


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write ``labels[H, W]`` as a PNG: indexed with the ovdense palette when all labels fit in
    0..255, else 16-bit grayscale (0..65535) holding the class indices themselves."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError("a label PNG holds labels 0..65535 only")
    if labels.size == 0 or labels.max() <= 255:
        pil = Image.fromarray(labels.astype(np.uint8), mode="P")
        pil.putpalette(palette().reshape(-1).tolist())
    else:
        pil = Image.fromarray(labels.astype(np.uint16))
    return write_bytes(path, _encode_pil(pil, "PNG"))


PROBABILITY_SCALE = 65535  # a probability PNG holds round(p · 65535)


def write_probability_png(path: str | os.PathLike, probability: np.ndarray) -> Path:
    """Write ``probability[H, W]`` (values in [0, 1]) as a 16-bit grayscale PNG holding
    ``round(p · 65535)``: viewable as a heat map, exact to ``1 / 131070``; read it back as
    ``np.asarray(Image.open(path)) / 65535``."""
    if probability.ndim != 2:
        raise ValueError(f"a probability map must be [H, W], got {probability.shape}")
    values = np.rint(np.clip(probability, 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint16)
    return write_bytes(path, _encode_pil(Image.fromarray(values), "PNG"))


def write_image(path: str | os.PathLike, rgb: np.ndarray, quality: int = 92) -> Path:
    """Write an RGB ``uint8`` array; the format follows the suffix (.png, .jpg)."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    params = {"quality": quality} if fmt == "JPEG" else {}
    return write_bytes(path, _encode_pil(Image.fromarray(rgb), fmt, **params))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))


def ordered(order: Sequence[str], own: Mapping[str, Any], info: Mapping[str, Any]) -> dict:
    """``own`` and ``info`` (``info`` winning) as one dict for ``write_json``: the keys of
    ``order`` first, in that order (those in neither left out), then any other key of ``info``,
    so a result's JSON keeps one key order whoever adds to it."""
    merged = {**own, **info}
    out = {key: merged[key] for key in order if key in merged}
    out.update((key, value) for key, value in info.items() if key not in out)
    return out


# --------------------------------------------------------------------------------------------
# Overlay


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
) -> np.ndarray:
    """Blend ``image[H, W, 3]`` with the colour map of ``labels[H, W]``; add a legend strip.

    The legend lists the classes present in ``labels`` (most pixels first) with their colour
    and pixel share; it is drawn on a white strip to the right of the image.
    Returns an RGB ``uint8`` array ``[H', W + 200, 3]``, ``H' = H`` unless the legend needs
    more rows. Labels above 255 share the palette's colours modulo 256. The blend runs over
    blocks of rows, so its float temporaries stay small for any image size.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    height, width = labels.shape
    if not legend:
        blended = np.empty((height, width, 3), np.uint8)
        _blend_rows(image, labels, alpha, blended)
        return blended
    counts = np.bincount(labels.reshape(-1), minlength=len(class_names))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    font = ImageFont.load_default()
    row = 16
    strip = 200
    canvas = np.full((max(height, row * (len(present) + 1)), width + strip, 3), 255, np.uint8)
    _blend_rows(image, labels, alpha, canvas[:height, :width])
    legend_strip = Image.new("RGB", (strip, canvas.shape[0]), (255, 255, 255))
    draw = ImageDraw.Draw(legend_strip)
    pal = palette()
    for n, index in enumerate(present):
        y = 4 + n * row
        colour = tuple(int(c) for c in pal[index % 256])  # labels above 255 share the palette
        draw.rectangle([6, y, 6 + 11, y + 11], fill=colour, outline=(0, 0, 0))
        name = class_names[index] if index < len(class_names) else str(index)
        share = 100.0 * counts[index] / labels.size
        draw.text((6 + 16, y), f"{name} {share:.1f}%", fill=(0, 0, 0), font=font)
    canvas[:, width:] = np.asarray(legend_strip)
    return canvas


def _blend_rows(image: np.ndarray, labels: np.ndarray, alpha: float, out: np.ndarray,
                rows: int = 256) -> None:
    """``out[H, W, 3] = round((1 − alpha)·image + alpha·palette[labels % 256])`` in float32,
    ``rows`` rows at a time."""
    colours = palette().astype(np.float32)
    for start in range(0, labels.shape[0], rows):
        block = slice(start, start + rows)
        blended = (1.0 - alpha) * image[block].astype(np.float32) + alpha * colours[labels[block] % 256]
        out[block] = np.clip(np.round(blended), 0, 255).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5,
                    value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Blend ``image[H, W, 3]`` with a JET colour map of ``anomaly_map[H, W]`` on the fixed scale
    ``value_range`` (so maps of different images compare): RGB ``uint8 [H, W, 3]``."""
    import cv2

    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"image {image.shape[:2]} and map {anomaly_map.shape} differ in size")
    low, high = value_range
    scaled = np.clip((anomaly_map.astype(np.float32) - low) / (high - low), 0, 1)
    colours = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def draw_detections(rgb: np.ndarray, result, alpha: float = 0.45) -> np.ndarray:
    """The overlay of ``ovdense detect``: ``rgb [H, W, 3]`` with each detection's mask blended in
    its class colour, its box, and a label ``"<class> <score>"`` on a tab of that colour (black or
    white text, whichever reads better): RGB ``uint8 [H, W, 3]``. ``result`` is a
    ``heads.fvit.DetectionResult``. Colours are the ovdense palette from index 1 (index 0 is
    black); the lowest scores are drawn first, so the best detection lies on top."""
    import cv2

    canvas = np.array(rgb, dtype=np.uint8, copy=True)
    H, W = canvas.shape[:2]
    colours = palette()
    order = np.argsort(np.asarray(result.scores), kind="stable")  # lowest first
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, min(H, W) / 900)
    thickness = max(1, round(min(H, W) / 400))
    if result.masks is not None:
        for k in order:
            mask = np.asarray(result.masks[k], dtype=bool)
            colour = colours[(int(result.class_ids[k]) + 1) % 256].astype(np.float32)
            blended = (1 - alpha) * canvas[mask].astype(np.float32) + alpha * colour
            canvas[mask] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    for k in order:
        colour = tuple(int(c) for c in colours[(int(result.class_ids[k]) + 1) % 256])
        x1, y1, x2, y2 = (int(round(float(v))) for v in result.boxes[k])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        text = f"{result.classes[int(result.class_ids[k])]} {float(result.scores[k]):.2f}"
        (tw, th), base = cv2.getTextSize(text, font, scale, 1)
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1  # above the box, or inside at its top
        left = min(max(x1, 0), max(W - tw - 2, 0))
        cv2.rectangle(canvas, (left, top), (left + tw + 2, top + th + base + 2), colour, cv2.FILLED)
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luma > 110 else (255, 255, 255)
        cv2.putText(canvas, text, (left + 1, top + th + 1), font, scale, ink, 1, cv2.LINE_AA)
    return canvas


# --------------------------------------------------------------------------------------------
# Checkpoints written by training code (mmengine): read without running their objects' code

#: What an mmengine training checkpoint (``Runner.save_checkpoint``: ``meta``, ``state_dict``,
#: ``message_hub``, ``optimizer``, ``param_schedulers``) holds besides tensors and plain values, by the
#: name its pickle records: the message hub's ``HistoryBuffer``s and their NumPy arrays and scalars.
MMENGINE_EXTRAS = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy.ndarray", "numpy.dtype", "builtins.getattr",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
)


class Placeholder:
    """An inert stand-in for an object of a checkpoint that ovdense does not read (``read_checkpoint``):
    built from anything, it keeps nothing and runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "Placeholder()"


def read_checkpoint(path: str | os.PathLike) -> Any:
    """A ``torch.save`` file read with ``torch.load(weights_only=True)`` only: tensors and plain values.

    A whole mmengine training checkpoint (what ``Runner`` writes, and what research code publishes)
    also holds its message hub's ``HistoryBuffer`` objects with NumPy arrays, which ``weights_only``
    refuses. For exactly those names (``MMENGINE_EXTRAS``) a second try gives torch's restricted
    unpickler ``Placeholder`` in their place: the file's tensors load as usual, those entries come
    back as empty ``Placeholder``s, and no code of mmengine, NumPy or the file runs. Any other object
    is still refused (``pickle.UnpicklingError`` naming it).
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise
    stand_ins = [(Placeholder, name) for name in MMENGINE_EXTRAS]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(path: str | os.PathLike) -> Any:
    """A weights file read without running any of its code: ``.safetensors`` by safetensors, anything
    else by ``read_checkpoint`` (``torch.load(weights_only=True)``). Errors are the readers' own;
    callers name the file and what they expected."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return read_checkpoint(path)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content (hex), read in 4 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
