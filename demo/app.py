"""The ovdense demo: a web page to segment an image with any words, compare the training-free
methods side by side, find things like an example image (CLIPSeg), detect objects named by any
words, and see defect maps.

    python demo/app.py [--model toy|ViT-B-16|CONFIG.json] [--pretrained TAG|FILE|none] [--port 7860]
                       [--san-head PATH] [--clipseg-head PATH] [--fvit-head PATH] [--adaptclip-head PATH]
                       [--sam-checkpoint PATH]

Needs the ``[demo]`` extra (gradio). The default model is ``toy``, the embedded CLIP of the
synthetic world: the page then runs offline and on a CPU. The server binds to 127.0.0.1 unless
``--host`` says otherwise.

The work is done by plain functions on numpy images — ``read_image``, ``parse_classes``,
``read_image_prompt``, ``parse_region``, ``parse_prompt_name``, ``segment_image``,
``compare_methods``, ``detect_image``, ``anomaly_map``, ``sam_clip_image`` — and ``build_app``
only wires them to gradio. One backbone is loaded at start and shared by every tab; the heads
(``Segmenter``, ``ClipSegSegmenter``, ``Detector``, ``WinClip``, ``AdaptClip``, ``SamClipSegmenter``,
each holding its text embeddings) are kept per (head, settings) in a small LRU (``Heads``), and the
library's disk cache keeps text embeddings across runs. The SAM + CLIP tab appears only with
``--sam-checkpoint``; the Detect tab with an F-ViT head (``--fvit-head``, or the one that ships
for the toy model). User errors (``OvdenseError``) are shown in the page as one message, never a
stack trace.

The Anomaly tab runs WinCLIP (WinCLIP+ with normal references) or AdaptCLIP (``ovdense.anomaly.adaptclip``:
zero-shot, few-shot with references of the query's size) with its adapters: ``--adaptclip-head``, or the
ones that ship for the toy model.

The Find like this tab (with a CLIPSeg head: ``--clipseg-head``, or the one that ships for the
toy model) adds one class named by an example image: the object is marked by a mask upload (its
non-zero pixels, the example's size) or a box ``x0, y0, x1, y1`` in the example's pixels, or is
the whole example; ``segment_image(..., image_prompts={name: (rgb, mask)})`` runs it. A cached
head's key holds the SHA-256 digests of the example's pixels and mask (``_frozen``), not the
arrays, so two different examples never share a head.

Under load: the model's handlers share one queue slot (``CONCURRENCY`` at a time, one model on one
machine) and at most ``--queue-size`` requests wait (``QUEUE_SIZE``); a request beyond that is
answered at once by gradio's "Queue is full ... try again" (HTTP 503), so memory stays bounded
by one request's work plus the waiting uploads. An upload over ``MAX_UPLOAD`` bytes is refused by
gradio before it is stored; a file over ``MAX_PIXELS`` (``ovdense.io``'s limit) is refused
from its header, before decoding.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovdense import ClipBackbone, OvdenseError, create_backbone, create_head
from ovdense.backbone.prompts import single_names
from ovdense.backbone.protocols import METHOD_INFO
from ovdense.cli.parser import VFM_NAMES
from ovdense.io import IMAGE_SUFFIXES, MAX_PIXELS, colorize, load_image
from ovdense.registry import DEFAULT_HEADS, HEADS, default_head, get_head, list_heads

HERE = Path(__file__).resolve().parent
MAX_SIDE = 1024  # longer images are downscaled (with a notice)
MAX_UPLOAD_BYTES = 25_000_000  # larger uploads are refused before they are read
MAX_UPLOAD = f"{MAX_UPLOAD_BYTES // 1_000_000}mb"
CONCURRENCY = 1  # model requests at a time
QUEUE_SIZE = 16  # requests waiting at most; more get "queue is full, try again"
MAX_CLASSES = 64
MAX_WORDS = 256  # synonyms of all classes together
MAX_WORD_LENGTH = 80
MAX_REFERENCES = 8
CACHE_SIZE = 16

log = logging.getLogger("ovdense.demo")


# --------------------------------------------------------------------------------------------
# Inputs


def read_image(path: str | Path | None, max_side: int = MAX_SIDE,
               max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """An uploaded file (where gradio saved it) → RGB ``uint8 [H, W, 3]`` and a notice (``""``
    unless it was downscaled).

    The file must have an image suffix, at most ``MAX_UPLOAD_BYTES`` bytes, decode as an image and
    have at most ``max_pixels`` pixels (checked from its header, before decoding); an image whose
    long side exceeds ``max_side`` is downscaled (area interpolation).

    Raises:
        OvdenseError: no file, wrong type, too many bytes or pixels, not decodable.
    """
    if path is None:
        raise OvdenseError("no image: upload one or pick an example")
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise OvdenseError(f"{path.name} is not an image file; upload one of: {' '.join(IMAGE_SUFFIXES)}")
    if path.is_file() and path.stat().st_size > MAX_UPLOAD_BYTES:
        raise OvdenseError(f"{path.name} has {path.stat().st_size / 1e6:.1f} MB; the demo takes at most "
                           f"{MAX_UPLOAD_BYTES / 1e6:g} MB")
    try:
        rgb = load_image(path, max_pixels=max_pixels)
    except OvdenseError as e:
        if "megapixels" in str(e):  # the page names the upload, not where the server keeps it
            size = str(e).split(";")[0].replace(str(path), path.name)
            raise OvdenseError(f"{size}; upload a smaller image") from None
        raise OvdenseError(f"{path.name} is not a readable image; upload a PNG, JPEG, BMP, TIFF "
                           "or WebP file") from e
    return _downscaled(rgb, max_side)


def _downscaled(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, str]:
    """``rgb [H, W, 3]`` with its long side at most ``max_side`` (area interpolation) and a notice
    (``""`` when it already fits)."""
    height, width = rgb.shape[:2]
    if max(height, width) <= max_side:
        return rgb, ""
    import cv2

    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return small, f"downscaled from {width}×{height} to {size[0]}×{size[1]} px (the limit is {max_side})"


def parse_classes(text: str, max_classes: int = MAX_CLASSES) -> list[tuple[str, ...]]:
    """``"sky, person|man|woman, car"`` → ``[("sky",), ("person", "man", "woman"), ("car",)]``.

    Classes are separated by commas or new lines, synonyms of one class by ``|`` (as on the
    command line).

    Raises:
        OvdenseError: no class, too many classes or words, a word too long.
    """
    classes = []
    for item in (text or "").replace("\n", ",").split(","):
        words = tuple(w.strip() for w in item.split("|") if w.strip())
        if words:
            classes.append(words)
    if not classes:
        raise OvdenseError("the class list is empty: type classes separated by commas, e.g. sky, tree, car")
    if len(classes) > max_classes:
        raise OvdenseError(f"{len(classes)} classes given; the demo takes at most {max_classes}")
    words = [w for c in classes for w in c]
    if len(words) > MAX_WORDS:
        raise OvdenseError(f"{len(words)} words given (synonyms included); the limit is {MAX_WORDS}")
    long = [w for w in words if len(w) > MAX_WORD_LENGTH]
    if long:
        raise OvdenseError(f"a class name is longer than {MAX_WORD_LENGTH} characters: {long[0][:40]}…")
    return classes


def parse_region(text: str | None) -> tuple[int, int, int, int] | None:
    """``"x0, y0, x1, y1"`` (pixels of the example; commas or spaces) → ``(x0, y0, x1, y1)``;
    empty → ``None``. The box holds the pixels ``x0 ≤ x < x1``, ``y0 ≤ y < y1`` (numpy's slices);
    corners given the other way round are put in order.

    Raises:
        OvdenseError: not four whole numbers.
    """
    items = (text or "").replace(",", " ").split()
    if not items:
        return None
    try:
        numbers = [int(item) for item in items]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise OvdenseError(f"the region {(text or '').strip()[:40]!r} is not four whole numbers: write "
                           "x0, y0, x1, y1 in pixels of the example, e.g. 10, 20, 110, 90")
    x0, y0, x1, y1 = numbers
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def read_image_prompt(example: str | Path | None, mask: str | Path | None = None,
                      region: tuple[int, int, int, int] | None = None,
                      max_side: int = MAX_SIDE) -> tuple[np.ndarray, np.ndarray, str]:
    """An example upload and where its object is → RGB ``uint8 [H, W, 3]``, the object's mask
    ``bool [H, W]`` and a notice (``""`` unless downscaled): the image prompt of CLIPSeg.

    The object is the non-zero pixels of the ``mask`` upload (any channel, as the command line's
    ``--image-prompt NAME=IMAGE:MASK`` reads it; it must have the example's size), or the box
    ``region`` ``(x0, y0, x1, y1)`` (``parse_region``; clipped to the example), or, with neither,
    the whole example (as ``NAME=IMAGE``). Both files are checked as ``read_image`` checks an
    upload; the example and its mask are then downscaled together to ``max_side`` (the mask
    nearest).

    Raises:
        OvdenseError: no example, an unreadable or oversized file, a mask and a region both given,
            a mask of another size, an empty mask or region.
    """
    if example is None:
        raise OvdenseError("no example image: upload an image that shows the object to find")
    if mask is not None and region is not None:
        raise OvdenseError("give the object as a mask or as a region, not both: clear one of them")
    rgb, _ = read_image(example, max_side=sys.maxsize)  # the sizes are compared before downscaling
    height, width = rgb.shape[:2]
    if mask is not None:
        marked, _ = read_image(mask, max_side=sys.maxsize)
        if marked.shape != rgb.shape:
            raise OvdenseError(f"the mask is {marked.shape[1]}×{marked.shape[0]} px, the example "
                               f"{width}×{height}: upload a mask of the example's size")
        region_mask = marked.max(axis=2) > 0  # H, W
        if not region_mask.any():
            raise OvdenseError(f"{Path(mask).name} is all black: the mask must be non-zero on the object")
    elif region is not None:
        x0, y0, x1, y1 = region
        region_mask = np.zeros((height, width), bool)  # H, W
        region_mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
        if not region_mask.any():
            raise OvdenseError(f"the region {x0}, {y0}, {x1}, {y1} holds no pixel of the {width}×{height} "
                               "example: give x0 < x1 and y0 < y1 inside it")
    else:
        region_mask = np.ones((height, width), bool)
    small, notice = _downscaled(rgb, max_side)
    if small.shape != rgb.shape:
        import cv2

        size = (small.shape[1], small.shape[0])
        region_mask = cv2.resize(region_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return small, region_mask, notice


def parse_prompt_name(text: str | None, classes: Sequence[tuple[str, ...]] = ()) -> str:
    """The class name of an image prompt: one name (no commas or ``|``), within the class list's
    limits (``MAX_WORD_LENGTH``; the classes and the prompt at most ``MAX_CLASSES``) and not a
    word of the other ``classes``.

    Raises:
        OvdenseError: empty, several names, too long, too many classes, or already a class.
    """
    name = (text or "").strip()
    if not name:
        raise OvdenseError("the example has no name: type the name its class gets in the result, "
                           "e.g. like this")
    if "," in name or "|" in name or "\n" in name:
        raise OvdenseError(f"the example's name {name[:40]!r} is one name: no commas or |")
    if len(name) > MAX_WORD_LENGTH:
        raise OvdenseError(f"the example's name is longer than {MAX_WORD_LENGTH} characters: {name[:40]}…")
    if len(classes) + 1 > MAX_CLASSES:
        raise OvdenseError(f"{len(classes)} classes and the example; the demo takes at most {MAX_CLASSES}")
    if any(name == word for words in classes for word in words):
        raise OvdenseError(f"{name!r} is already a class: give the example another name")
    return name


def prompt_preview(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The example ``[H, W, 3]`` as the page shows it: the marked pixels as they are, the rest
    dimmed to a third."""
    return np.where(mask[..., None], rgb, rgb // 3)


# --------------------------------------------------------------------------------------------
# The work: numpy in, numpy and tables out


class Heads:
    """The heads on one shared backbone, built on first use (``ovdense.create_head``) and kept per
    (head, settings): the ``size`` most recently used. A head holds its text embeddings, so a
    repeated vocabulary costs nothing; a new one is encoded once (and then read from the
    library's disk cache).

    Args:
        backbone: the shared CLIP backbone.
        sam: a segment-anything model for the heads that need one (SAM + CLIP; ``load_sam``), or ``None``.
        vfm: a second vision model for the heads that need one (ProxyCLIP; ``create_vfm``), or ``None``.
        size: how many heads to keep.
        head_checkpoints: ``<name>_head=PATH`` for a trained head (``san_head``, ``fvit_head``,
            ``adaptclip_head``: ``TRAINED``); one not given is the head that ships for the
            backbone, if any. Each is also an attribute (``heads.san_head``: the path, or ``None``).
    """

    def __init__(self, backbone: ClipBackbone, sam=None, size: int = CACHE_SIZE, vfm=None,
                 **head_checkpoints: str | Path | None):
        unknown = sorted(set(head_checkpoints) - {head_keyword(name) for name in TRAINED})
        if unknown:
            raise TypeError(f"Heads() got unexpected arguments {unknown}; trained heads: {TRAINED}")
        self.backbone = backbone
        self.sam = sam
        self.vfm = vfm
        self.size = size
        self.checkpoints: dict[str, str | Path | None] = {}
        for name in TRAINED:
            given = head_checkpoints.get(head_keyword(name))
            self.checkpoints[name] = given if given is not None else HEADS[name].shipped_checkpoint(backbone)
            setattr(self, head_keyword(name), self.checkpoints[name])
        self._cache: OrderedDict[tuple, object] = OrderedDict()

    def available(self, kind: str) -> list[str]:
        """The registered heads of ``kind`` this page can run: a trained one with its checkpoint at
        hand, one that needs SAM with a SAM model."""
        return [name for name in list_heads(kind) if not self._missing(HEADS[name])]

    @property
    def methods(self) -> list[str]:
        """The Segment tab's methods: the registry's segmentation heads that can run here."""
        return self.available("segmentation")

    @property
    def prompt_methods(self) -> list[str]:
        """The segmentation heads that take example images (``image_prompt`` among their
        registry options: CLIPSeg) and can run here: the Find-like-this tab's."""
        return [name for name in self.methods if "image_prompt" in HEADS[name].options]

    @property
    def default_method(self) -> str:
        """The Segment tab's first choice: the model's own (its config's ``"ovdense"`` entry, as
        the CLI's ``segment``), else the registry's default."""
        own = self.backbone.defaults.get("method")
        return own if own in self.methods else DEFAULT_HEADS["segmentation"]

    def _missing(self, entry) -> str:
        """Why ``entry`` cannot run here (``""``: it can)."""
        if entry.trained and self.checkpoints.get(entry.name) is None:
            return f"no {entry.title} head: start the demo with --{entry.name}-head PATH"
        if "sam" in entry.needs and self.sam is None:
            return "no SAM model: start the demo with --sam-checkpoint PATH"
        if "vfm" in entry.needs and self.vfm is None:
            return "no second vision model: start the demo with --vfm NAME --vfm-weights PATH"
        return ""

    def head(self, name: str, *args, **settings):
        """Head ``name`` of the registry with the kind's ``args`` and ``settings`` (``None``: the
        head's default); a setting the head does not have is refused, not ignored."""
        entry = get_head(name)
        missing = self._missing(entry)
        if missing:
            raise OvdenseError(missing)
        given = {key: value for key, value in settings.items() if value is not None}
        foreign = [key for key in given if OPTION_NAMES.get(key, key) not in entry.options]
        if foreign:
            raise OvdenseError(f"{entry.title} has no {' or '.join(foreign)} option; leave it at the default")
        needs = {key: getattr(self, key) for key in ("sam", "vfm") if key in entry.needs}
        if entry.trained:
            needs["head_checkpoint"] = self.checkpoints[entry.name]
        key = (name, _frozen(args), _frozen(given))
        return self._get(key, lambda: create_head(name, self.backbone, *args, **needs, **given))

    def segmenter(self, method: str, classes: Sequence[tuple[str, ...]], **settings):
        """A segmentation head for ``classes``; ``image_prompts={name: (rgb, mask)}`` adds classes
        named by an example (the heads of ``prompt_methods``), keyed by the examples' digests."""
        return self.head(method, [list(c) for c in classes], **settings)

    def winclip(self, object_name: str):
        """The WinCLIP head for ``object_name`` (its prompts name the object), one per name."""
        return self.head(DEFAULT_HEADS["anomaly"], object_name.strip())

    def adaptclip(self):
        """The AdaptCLIP head (``ovdense.anomaly.adaptclip.AdaptClip``), built once for the backbone:
        its prompts say "object" whatever the object, so one head serves every name.

        Raises:
            OvdenseError: no adapters for this backbone (none given, none ship), or a file that
                is not AdaptCLIP's adapters for it.
        """
        from ovdense.anomaly.adaptclip import AdaptClip

        checkpoint = self.checkpoints[ADAPTCLIP]
        if checkpoint is None:
            raise OvdenseError(f"no AdaptCLIP adapters for {Path(self.backbone.name).name}: start the demo "
                               "with --adaptclip-head PATH (they ship for the toy model only; docs/demo.md)")
        return self._get((ADAPTCLIP, str(checkpoint)),
                         lambda: AdaptClip(self.backbone, head_checkpoint=checkpoint))

    def sam_clip(self, method: str, classes: Sequence[tuple[str, ...]], **settings):
        """The head that needs SAM (SAM + CLIP) with the dense features of ``method``."""
        (name,) = [name for name in list_heads("segmentation") if "sam" in HEADS[name].needs]
        return self.head(name, [list(c) for c in classes], method=method, **settings)

    def detector(self, classes: Sequence[tuple[str, ...]], score_threshold: float):
        """The detection head (F-ViT) for these classes (one name each) and score threshold."""
        return self.head(default_head("detection").name, single_names(classes),
                         score_threshold=float(score_threshold))

    def _get(self, key: tuple, build: Callable[[], object]):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        head = build()
        self._cache[key] = head
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return head


TRAINED = [name for name in HEADS if HEADS[name].trained]  # each has a --<name>-head flag
ADAPTCLIP = "adaptclip"  # the Anomaly tab's trained head (Heads.adaptclip)


def head_keyword(name: str) -> str:
    """The keyword (and ``--<name>-head`` destination) of a trained head's checkpoint:
    ``san`` → ``san_head``, ``clip-dinoiser`` → ``clip_dinoiser_head``."""
    return name.replace("-", "_") + "_head"


# a head's keyword → its option in the registry (the CLI's name)
OPTION_NAMES = {"method": "clip_method", "image_prompts": "image_prompt"}


def _frozen(value):
    """A hashable copy of nested lists, tuples and dicts (a cache key); an array becomes its
    shape, dtype and SHA-256 digest, so an image prompt's pixels key its head without the key
    holding them, and two examples that differ in one pixel (or one mask pixel) never share one."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _frozen(v)) for key, v in value.items()))
    if isinstance(value, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        return ("array", value.shape, value.dtype.str, digest)
    return value


@dataclass
class Segmentation:
    """What the page shows for one method: ``overlay [H, W + 200, 3]`` (with a legend),
    ``label_map [H, W, 3]`` (the palette's colours), per-class ``shares`` rows
    ``[class, synonyms, percent]`` and the prediction's wall time in ``seconds``."""

    overlay: np.ndarray
    label_map: np.ndarray
    shares: list[list]
    seconds: float


def segment_image(
    heads: Heads,
    rgb: np.ndarray,
    classes: Sequence[tuple[str, ...]],
    method: str,
    bg_threshold: float | None = None,
    pamr: bool | None = None,
    image_prompts: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Segmentation:
    """Segment ``rgb [H, W, 3]`` with ``method``; ``None`` settings are the method's defaults.

    ``image_prompts`` ``{name: (rgb [h, w, 3] uint8, mask [h, w] bool)}`` (``read_image_prompt``)
    adds one class per example after ``classes``, for a method of ``heads.prompt_methods``
    (CLIPSeg: "find things like this"); another method refuses them."""
    segmenter = heads.segmenter(method, classes, bg_threshold=bg_threshold, pamr=pamr,
                                image_prompts=image_prompts or None)
    start = time.perf_counter()
    result = segmenter.predict(rgb)
    seconds = time.perf_counter() - start
    words = [", ".join(c) for c in classes] + ["an example image"] * len(image_prompts or {})
    shares = [
        [name, described, round(100.0 * share, 2)]
        for name, described, share in zip(result.classes, words, result.class_shares())
    ]
    return Segmentation(result.overlay(rgb), colorize(result.labels), shares, seconds)


def compare_methods(
    heads: Heads,
    rgb: np.ndarray,
    classes: Sequence[tuple[str, ...]],
    methods: Sequence[str] | None = None,
    bg_threshold: float | None = None,
    pamr: bool | None = None,
    on_step: Callable[[int, int, str], None] | None = None,
) -> dict[str, Segmentation | str]:
    """Every method on the same image: ``{method: Segmentation}``, or the reason a method
    cannot run on this model (e.g. ITACLIP needs 12 blocks) in place of its result. ``None`` =
    ``heads.methods`` but the heads that need another model (SAM + CLIP: it has its own tab, and
    its automatic masks take minutes on a CPU)."""
    methods = [m for m in heads.methods if not HEADS[m].needs] if methods is None else methods
    results: dict[str, Segmentation | str] = {}
    for index, method in enumerate(methods):
        if on_step is not None:
            on_step(index, len(methods), method)
        try:
            results[method] = segment_image(heads, rgb, classes, method, bg_threshold, pamr)
        except OvdenseError as e:
            results[method] = str(e)
    return results


def comparison_table(results: dict[str, Segmentation | str]) -> list[list]:
    """Rows ``[method, seconds, largest class, note]`` of ``compare_methods``' results."""
    rows = []
    for method, result in results.items():
        if isinstance(result, str):
            rows.append([method, None, "", f"not run: {result}"])
        else:
            name, _, share = max(result.shares, key=lambda row: row[2])
            rows.append([method, round(result.seconds, 3), f"{name} {share:.1f}%", ""])
    return rows


ANOMALY_METHODS = ("WinCLIP", "AdaptCLIP")  # the Anomaly tab's choices


def anomaly_map(heads: Heads, rgb: np.ndarray, object_name: str, references: Sequence[np.ndarray] = (),
                method: str = "WinCLIP") -> tuple[np.ndarray, float, np.ndarray, str]:
    """Defects in ``rgb [H, W, 3]`` by ``method`` (``ANOMALY_METHODS``): WinCLIP (zero-shot) or, with
    normal ``references``, WinCLIP+; AdaptCLIP zero-shot or, with ``references`` (all of the image's
    size: its prompt–query adapter compares patches position by position), few-shot.

    Returns the heat-map overlay ``[H, W, 3]`` (JET on the fixed scale 0–1), the image score in
    [0, 1], the map ``[H, W]`` float32 and the mode that ran (``AnomalyResult.mode``, e.g.
    ``"AdaptCLIP (2-shot)"``).

    Raises:
        OvdenseError: an unknown method, an empty object name (WinCLIP), no AdaptCLIP adapters for
            the backbone, references of different sizes or of another size than the image (AdaptCLIP).
    """
    if method == "WinCLIP":
        head = heads.winclip(object_name)
    elif method == "AdaptCLIP":
        head = heads.adaptclip()  # "object" in its prompts: the name is not needed
    else:
        raise OvdenseError(f"unknown anomaly method {method!r}; choose from: {', '.join(ANOMALY_METHODS)}")
    if references:
        head.set_references(list(references))
    else:  # the cached head may hold an earlier request's references
        head.memory = None
        if method == "AdaptCLIP":
            head.reference_size = None
    (result,) = head.predict([rgb])
    return result.overlay(rgb), result.score, result.map, result.mode


@dataclass
class Detection:
    """What the Detect tab shows: ``overlay [H, W, 3]`` (masks, boxes, labels with scores),
    ``rows`` ``[class, score, x, y, w, h]`` one per detection (COCO boxes in pixels of the shown
    image), ``report`` the JSON ``ovdense detect`` writes (``{"classes", "detections"}``, masks as
    COCO RLE) and the prediction's wall time in ``seconds``."""

    overlay: np.ndarray
    rows: list[list]
    report: dict
    seconds: float


def detect_image(heads: Heads, rgb: np.ndarray, classes: Sequence[tuple[str, ...]],
                 score_threshold: float = 0.3) -> Detection:
    """Detect ``classes`` (one name each) in ``rgb [H, W, 3]`` with the F-ViT head
    (``ovdense.heads.fvit.Detector``), keeping scores ≥ ``score_threshold``."""
    detector = heads.detector(classes, score_threshold)
    start = time.perf_counter()
    result = detector.predict(rgb)
    seconds = time.perf_counter() - start
    report = result.to_json()
    rows = [[d["class"], round(d["score"], 3), *(round(v, 1) for v in d["bbox"])]
            for d in report["detections"]]
    return Detection(result.overlay(rgb), rows, report, seconds)


def sam_clip_image(heads: Heads, rgb: np.ndarray, classes: Sequence[tuple[str, ...]],
                   method: str = DEFAULT_HEADS["segmentation"],
                   **settings) -> tuple[np.ndarray, np.ndarray, list[list]]:
    """SAM's automatic masks on ``rgb [H, W, 3]``, each classified from one dense CLIP pass of
    ``method`` (``ovdense.heads.sam_clip``; ``settings`` are ``SamClipSegmenter``'s, e.g.
    ``points_per_side``): the overlay with mask outlines ``[H, W + 200, 3]``, the semantic
    label map ``[H, W, 3]`` and rows ``[class, score, area px]``, one per mask."""
    result = heads.sam_clip(method, classes, **settings).predict(rgb)
    rows = [[i.name, round(i.score, 3), i.area] for i in result.instances]
    return result.overlay(rgb), colorize(result.labels), rows


# --------------------------------------------------------------------------------------------
# The page


def _shown_in_page(fn: Callable) -> Callable:
    """Run a gradio handler; an ``OvdenseError`` becomes a ``gr.Error`` (its one-line message in
    the page), any other exception is logged with its traceback and shown as one line."""
    import gradio as gr

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except OvdenseError as e:
            raise gr.Error(html.escape(str(e)), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the page shows one line, the log the traceback
            log.exception("demo: %s failed", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}); the server's log has the details",
                           print_exception=False) from None

    return handler


def _examples() -> list[list[str]]:
    example = HERE / "example.png"
    if not example.is_file():
        return []
    toy_classes = HERE / "toy_classes.txt"
    rows = [[str(example), "background, purple triangle, green triangle, blue circle, purple star"]]
    if toy_classes.is_file():
        words = [line.strip() for line in toy_classes.read_text().splitlines() if line.strip()]
        rows.append([str(example), ", ".join(words)])
    return rows


def build_app(backbone: ClipBackbone, sam=None, title: str = "ovdense demo", queue_size: int = QUEUE_SIZE,
              vfm=None, **head_checkpoints: str | Path | None):
    """The gradio page (a ``gr.Blocks``) on one shared ``backbone``; ``launch()`` serves it.

    One tab per head; the SAM + CLIP tab only with a ``sam`` model (``sam_clip.load_sam``); ProxyCLIP
    among the Segment tab's methods only with a ``vfm`` (``vfm.create_vfm``). The
    model's handlers take turns (``CONCURRENCY``) and at most ``queue_size`` requests wait. The
    Segment tab offers every segmentation head of the registry that can run here (``Heads``): a
    trained one with its checkpoint (``<name>_head=PATH``, e.g. ``san_head``, or the one that
    ships for the backbone); the Detect tab appears with a detection head's checkpoint
    (``fvit_head`` or the shipped one), the Find-like-this tab (image prompts) with a head of
    ``Heads.prompt_methods`` (CLIPSeg: ``clipseg_head`` or the shipped one)."""
    import gradio as gr

    heads = Heads(backbone, sam, vfm=vfm, **head_checkpoints)
    weights = backbone.weights.value or backbone.weights.kind
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nModel **{Path(backbone.name).name}** ({Path(weights).name}). "
                    "Type any words; the page answers at pixel level.")
        with gr.Tab("Segment"):
            _segment_tab(heads)
        if heads.available("detection"):
            with gr.Tab("Detect"):
                _detect_tab(heads)
        if heads.prompt_methods:
            with gr.Tab("Find like this"):
                _prompt_tab(heads)
        with gr.Tab("Anomaly"):
            _anomaly_tab(heads)
        if sam is not None:
            with gr.Tab("SAM + CLIP"):
                _sam_clip_tab(heads)
    app.queue(default_concurrency_limit=CONCURRENCY, max_size=queue_size)  # one model: requests take turns
    return app


PAMR_CHOICES = {"method default": None, "on": True, "off": False}


def _segment_tab(heads: Heads) -> None:
    import gradio as gr

    progress_bar = gr.Progress()  # gradio fills in a handler's argument whose default is one

    def preview(path):
        return (None, "") if path is None else read_image(path)

    def run(path, text, method, bg, pamr, compare, progress=progress_bar):
        rgb, notice = read_image(path)
        classes = parse_classes(text)
        settings = {"bg_threshold": float(bg) or None, "pamr": PAMR_CHOICES[pamr]}
        if compare:
            step = lambda i, n, m: progress(i / n, desc=f"{m} ({i + 1}/{n})")  # noqa: E731
            results = compare_methods(heads, rgb, classes, on_step=step, **settings)
            chosen = results[method]
            if isinstance(chosen, str):
                raise OvdenseError(chosen)
            gallery = [(r.overlay, f"{m} · {r.seconds:.2f} s") for m, r in results.items()
                       if not isinstance(r, str)]
            table = comparison_table(results)
        else:
            progress(0, desc=f"{method}: segmenting")
            chosen = segment_image(heads, rgb, classes, method, **settings)
            gallery, table = [], []
        height, width = rgb.shape[:2]
        status = f"**{method}** on {width}×{height} px: {chosen.seconds:.2f} s"
        if notice:
            status += f" — {notice}"
        return chosen.overlay, chosen.label_map, chosen.shares, status, gallery, table

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                             elem_id="image-upload")
            shown = gr.Image(label="Input", type="numpy", format="png", interactive=False, height=240,
                             elem_id="input-preview")
            notice = gr.Markdown(elem_id="input-notice")
            classes = gr.Textbox(label="Classes", lines=2, elem_id="classes",
                                 placeholder="sky, building, tree, person|man|woman, car",
                                 info="separated by commas; synonyms of one class joined by |")
            method = gr.Dropdown(heads.methods, value=heads.default_method, label="Method",
                                 elem_id="method")
            with gr.Accordion("Options", open=False):
                bg = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Background threshold",
                               info="pixels less sure than this become the first class; 0 = off")
                pamr = gr.Radio(list(PAMR_CHOICES), value="method default", label="PAMR refinement")
            compare = gr.Checkbox(label="Compare all methods side by side", elem_id="compare")
            button = gr.Button("Segment", variant="primary", elem_id="run-segment")
            gr.Examples(_examples(), inputs=[upload, classes], label="Examples")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="segment-status")
            shown_overlay = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay")
            with gr.Row():
                label_map = gr.Image(label="Label map", format="png", interactive=False, elem_id="label-map")
                shares = gr.Dataframe(headers=["class", "words", "pixels %"], label="Pixel shares",
                                      interactive=False, wrap=True, column_widths=["35%", "40%", "25%"],
                                      elem_id="shares")
            with gr.Column(visible=False) as compared:
                gallery = gr.Gallery(label="All methods", format="png", columns=3, height="auto",
                                     object_fit="contain", elem_id="compare-gallery")
                times = gr.Dataframe(headers=["method", "seconds", "largest class", "note"],
                                     label="Wall times", interactive=False, wrap=True,
                                     column_widths=["15%", "15%", "30%", "40%"], elem_id="compare-table")
    upload.change(_shown_in_page(preview), upload, [shown, notice], api_name="preview",
                  concurrency_id="preview", concurrency_limit=2)
    compare.change(lambda on: gr.Column(visible=on), compare, compared)
    button.click(_shown_in_page(run), [upload, classes, method, bg, pamr, compare],
                 [shown_overlay, label_map, shares, status, gallery, times], api_name="segment",
                 concurrency_id="model", concurrency_limit=CONCURRENCY)


def _prompt_tab(heads: Heads) -> None:
    """Find things like an example: an image, classes by words, and one class by an example image
    whose object is marked by a mask upload or a box (``read_image_prompt``)."""
    import gradio as gr

    progress_bar = gr.Progress()

    def preview(example, mask, region):
        if example is None:
            return None, ""
        rgb, marked, notice = read_image_prompt(example, mask, parse_region(region))
        return prompt_preview(rgb, marked), notice

    def run(path, text, example, mask, region, name, method, bg, progress=progress_bar):
        classes = parse_classes(text)
        name = parse_prompt_name(name, classes)
        box = parse_region(region)
        rgb, notice = read_image(path)
        example_rgb, example_mask, example_notice = read_image_prompt(example, mask, box)
        progress(0, desc=f"{method}: segmenting")
        chosen = segment_image(heads, rgb, classes, method, bg_threshold=float(bg),
                               image_prompts={name: (example_rgb, example_mask)})
        height, width = rgb.shape[:2]
        status = (f"**{method}** with the example *{html.escape(name)}* on {width}×{height} px: "
                  f"{chosen.seconds:.2f} s")
        notices = [f"image {notice}" if notice else "", f"example {example_notice}" if example_notice else ""]
        status += "".join(f" — {n}" for n in notices if n)
        return (chosen.overlay, chosen.label_map, chosen.shares, status,
                prompt_preview(example_rgb, example_mask))

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                             elem_id="prompt-upload")
            classes = gr.Textbox(label="Classes", value="background", lines=1, elem_id="prompt-classes",
                                 info="by words, separated by commas; name the background first")
            example = gr.File(label="Example image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                              elem_id="prompt-example")
            mask = gr.File(label="Mask of the example (optional)", file_types=list(IMAGE_SUFFIXES),
                           type="filepath", elem_id="prompt-mask")
            region = gr.Textbox(label="Or a region of the example: x0, y0, x1, y1", elem_id="prompt-region",
                                placeholder="10, 20, 110, 90",
                                info="pixels; the mask's non-zero pixels instead; neither: the whole example")
            marked = gr.Image(label="Example (the object as marked)", type="numpy", format="png",
                              interactive=False, height=200, elem_id="prompt-preview")
            example_notice = gr.Markdown(elem_id="prompt-example-notice")
            name = gr.Textbox(label="Name of the example's class", value="like this", elem_id="prompt-name")
            methods = heads.prompt_methods
            method = gr.Dropdown(methods, value=methods[0], label="Method", visible=len(methods) > 1,
                                 elem_id="prompt-method")
            bg = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Background threshold",
                           info="pixels no class reaches this sure become the first class; 0 = off")
            button = gr.Button("Find", variant="primary", elem_id="run-prompt")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="prompt-status")
            shown_overlay = gr.Image(label="Overlay", format="png", interactive=False,
                                     elem_id="prompt-overlay")
            with gr.Row():
                label_map = gr.Image(label="Label map", format="png", interactive=False,
                                     elem_id="prompt-label-map")
                shares = gr.Dataframe(headers=["class", "words", "pixels %"], label="Pixel shares",
                                      interactive=False, wrap=True, elem_id="prompt-shares")
    gr.on([example.change, mask.change, region.submit, region.blur], _shown_in_page(preview),
          [example, mask, region], [marked, example_notice], api_name="prompt_preview",
          concurrency_id="preview", concurrency_limit=2)
    button.click(_shown_in_page(run), [upload, classes, example, mask, region, name, method, bg],
                 [shown_overlay, label_map, shares, status, marked], api_name="prompt_segment",
                 concurrency_id="model", concurrency_limit=CONCURRENCY)


def _detect_tab(heads: Heads) -> None:
    import gradio as gr

    progress_bar = gr.Progress()

    def run(path, text, threshold, progress=progress_bar):
        rgb, notice = read_image(path)
        classes = parse_classes(text)
        progress(0, desc="detecting")
        found = detect_image(heads, rgb, classes, float(threshold))
        height, width = rgb.shape[:2]
        status = f"**{len(found.rows)} detections** on {width}×{height} px: {found.seconds:.2f} s"
        return found.overlay, found.rows, found.report, status + (f" — {notice}" if notice else "")

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                             elem_id="detect-upload")
            classes = gr.Textbox(label="Classes", lines=2, placeholder="red circle, blue star",
                                 info="separated by commas, one name per class", elem_id="detect-classes")
            threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold",
                                  info="keep detections scoring at least this", elem_id="detect-threshold")
            button = gr.Button("Detect", variant="primary", elem_id="run-detect")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="detect-status")
            drawn = gr.Image(label="Detections", format="png", interactive=False, elem_id="detect-overlay")
            table = gr.Dataframe(headers=["class", "score", "x", "y", "w", "h"], label="Detections (pixels)",
                                 interactive=False, elem_id="detect-table")
            report = gr.JSON(label="JSON (as ovdense detect writes it; masks as COCO RLE)",
                             elem_id="detect-json")
    button.click(_shown_in_page(run), [upload, classes, threshold], [drawn, table, report, status],
                 api_name="detect", concurrency_id="model", concurrency_limit=CONCURRENCY)


def _anomaly_tab(heads: Heads) -> None:
    import gradio as gr

    progress_bar = gr.Progress()

    def run(path, object_name, reference_paths, method="WinCLIP", progress=progress_bar):
        rgb, _ = read_image(path)
        reference_paths = reference_paths or []
        if len(reference_paths) > MAX_REFERENCES:
            raise OvdenseError(f"{len(reference_paths)} reference images; the limit is {MAX_REFERENCES}")
        references = [read_image(p)[0] for p in reference_paths]
        progress(0, desc=f"{method}: {len(references)}-shot" if references else f"{method}: zero-shot")
        heat, score, _, mode = anomaly_map(heads, rgb, object_name, references, method)
        return heat, f"**image score {score:.3f}** by {mode} (0 = normal, 1 = anomalous)"

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                             elem_id="anomaly-upload")
            method = gr.Radio(list(ANOMALY_METHODS), value="WinCLIP", label="Method",
                              info="AdaptCLIP: trained adapters (the toy model's ship; --adaptclip-head)",
                              elem_id="anomaly-method")
            object_name = gr.Textbox(label="Object", placeholder="bottle", elem_id="object-name",
                                     info="what the image shows (WinCLIP's prompts; AdaptCLIP says 'object')")
            references = gr.File(label=f"Normal references (optional, at most {MAX_REFERENCES}; "
                                 "for AdaptCLIP of the image's size)", file_types=list(IMAGE_SUFFIXES),
                                 file_count="multiple", type="filepath", elem_id="references")
            button = gr.Button("Find defects", variant="primary", elem_id="run-anomaly")
        with gr.Column(scale=2):
            score = gr.Markdown(elem_id="anomaly-score")
            heat = gr.Image(label="Anomaly heat map (0–1)", format="png", interactive=False,
                            elem_id="heatmap")
    button.click(_shown_in_page(run), [upload, object_name, references, method], [heat, score],
                 api_name="anomaly", concurrency_id="model", concurrency_limit=CONCURRENCY)


def _sam_clip_tab(heads: Heads) -> None:
    import gradio as gr

    progress_bar = gr.Progress()

    def run(path, text, method, points, progress=progress_bar):
        rgb, notice = read_image(path)
        classes = parse_classes(text)
        progress(0, desc="SAM masks, one CLIP pass")
        start = time.perf_counter()
        drawn, label_map, rows = sam_clip_image(heads, rgb, classes, method, points_per_side=int(points))
        status = f"**{len(rows)} masks** in {time.perf_counter() - start:.1f} s"
        return drawn, label_map, rows, status + (f" — {notice}" if notice else "")

    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                             elem_id="sam-upload")
            classes = gr.Textbox(label="Classes", lines=2, placeholder="background, cat, dog",
                                 info="the first class paints pixels no mask covers", elem_id="sam-classes")
            first = heads.default_method
            first = first if first in METHOD_INFO else DEFAULT_HEADS["segmentation"]  # a training-free one
            method = gr.Dropdown(list(METHOD_INFO), value=first, label="CLIP features of",
                                 elem_id="sam-method")
            points = gr.Slider(4, 64, value=32, step=1, label="SAM points per side",
                               info="fewer is faster (SAM's default 32: 1024 prompts)", elem_id="sam-points")
            button = gr.Button("Segment with SAM + CLIP", variant="primary", elem_id="run-sam")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="sam-status")
            drawn = gr.Image(label="Masks", format="png", interactive=False, elem_id="sam-overlay")
            with gr.Row():
                label_map = gr.Image(label="Label map", format="png", interactive=False,
                                     elem_id="sam-label-map")
                masks = gr.Dataframe(headers=["class", "score", "pixels"], label="Masks", interactive=False,
                                     elem_id="sam-masks")
    button.click(_shown_in_page(run), [upload, classes, method, points], [drawn, label_map, masks, status],
                 api_name="sam_clip", concurrency_id="model", concurrency_limit=CONCURRENCY)


# --------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The ovdense demo page (gradio).")
    parser.add_argument("--model", default="toy",
                        help="'toy' (offline), an open_clip ViT name, or a JSON config")
    parser.add_argument("--pretrained", help="open_clip tag or checkpoint file; 'none' = random weights "
                        "(default: the embedded weights for 'toy', 'openai' for open_clip models)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, …")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--sam-checkpoint",
                        help="SAM weights (e.g. sam_vit_b_01ec64.pth): adds the SAM + CLIP tab ([sam] extra)")
    parser.add_argument("--sam-model", choices=("vit_b", "vit_l", "vit_h"),
                        help="SAM model type (default: read from the checkpoint's file name)")
    parser.add_argument("--vfm", choices=VFM_NAMES,
                        help="with --vfm-weights: adds ProxyCLIP to the Segment tab (default dino_vitb8)")
    parser.add_argument("--vfm-weights",
                        help="the VFM's official weights file (e.g. dino_vitbase8_pretrain.pth)")
    for name in TRAINED:  # --san-head, --fvit-head: one per trained head of the registry
        entry = HEADS[name]
        where = {"segmentation": "the Segment tab's methods", "detection": "the Detect tab"}.get(
            entry.kind, "the Anomaly tab")
        if "image_prompt" in entry.options:
            where += " and the Find like this tab (image prompts)"
        parser.add_argument(f"--{name}-head", dest=head_keyword(name),
                            help=f"a trained {entry.title} head ({name}_head.safetensors) for this model: "
                            f"adds '{name}' to {where} (default: the one that ships for the model, if any: "
                            "the toy model's)")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                        help=f"requests that may wait; more are told to try again (default {QUEUE_SIZE})")
    args = parser.parse_args(argv)
    if args.queue_size < 1:
        parser.error(f"--queue-size must be ≥ 1, got {args.queue_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the demo runs offline
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("ovdense demo: error: gradio is not installed; pip install -e '.[demo]'", file=sys.stderr)
        return 2
    from ovdense.cli import _pretrained

    try:
        backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                                   device=args.device)
        sam = None
        if args.sam_checkpoint:
            from ovdense.heads.sam_clip import load_sam

            sam = load_sam(args.sam_checkpoint, args.sam_model, device=args.device)
        vfm = None
        if args.vfm_weights:
            from ovdense.backbone.vfm import create_vfm

            vfm = create_vfm(args.vfm or "dino_vitb8", args.vfm_weights, device=args.device)
        elif args.vfm:
            raise OvdenseError(f"--vfm {args.vfm} needs --vfm-weights PATH (its official weights file)")
        checkpoints = {head_keyword(name): getattr(args, head_keyword(name)) for name in TRAINED}
        for name in TRAINED:  # refuse a wrong head before serving
            if checkpoints[head_keyword(name)]:
                HEADS[name].load_checkpoint(checkpoints[head_keyword(name)], backbone)
    except OvdenseError as e:
        print(f"ovdense demo: error: {e}", file=sys.stderr)
        return 2
    app = build_app(backbone, sam, queue_size=args.queue_size, vfm=vfm, **checkpoints)
    try:
        app.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD)
    except (OSError, ValueError) as e:  # the port is taken, the address is not this machine's, or
        # gradio's own request to the page failed (behind a proxy: set no_proxy=127.0.0.1,localhost)
        print(f"ovdense demo: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
