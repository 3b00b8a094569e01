"""Training-free open-vocabulary segmentation: the ``Segmenter`` and its inference protocol.

The protocol is the official repos' (SCLIP ``clip_segmentor.py``, ClearCLIP and NACLIP
``*_segmentor.py``/``naclip.py``, all on mmseg 1.x):

1. resize so the short side is ``short_side`` (long side capped at 2048, mmcv's ``imrescale``
   rule with bilinear interpolation), normalise with the backbone's mean and std;
2. sliding windows of ``window = (crop, stride)`` (mmseg ``slide_inference``): each window is
   zero-padded to a patch multiple, centred (ClearCLIP's ``compute_padsize``; a no-op for the
   usual patch-multiple windows; ProxyCLIP pads to multiples of 56 and its VFM sees the window
   too), its patch–prompt cosine logits are upsampled bilinearly to
   the padded window and cut back; the canvas sums them and divides by the number of windows
   covering each pixel;
3. the canvas is resized bilinearly to the original image; optional PAMR refines these logits
   guided by the normalised image resized to the same size (dilations 8 and 16, 10 steps);
4. ``softmax(logit_scale · logits)`` over all ``Q`` prompts (every synonym of every class); a
   class's probability is the max over its synonyms;
5. optional area threshold (SCLIP/ITACLIP ``area_thd``): a class other than 0 whose argmax
   area is at most ``area_threshold`` of all non-background argmax pixels gets probability 0;
6. the label is the argmax over classes; pixels whose best probability is below
   ``bg_threshold`` become class 0 (background; ``prob_thd`` in the repos).

Method extras, each off unless the method's protocol or the caller turns it on: ITACLIP's image
engineering (in step 2), its class definitions (in the text features) and its 3×3 closing of
the label map; CLIPtrase's cluster vote (after step 6).

Steps 2–6 run on the windows' low-resolution logits through ``ovdense.kernels`` (exact, and
never holding the ``[Q, H, W]`` logits) unless PAMR or the area threshold need the full
logits, or ``kernel="reference"`` asks for the plain path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from ovdense import kernels
from ovdense.backbone.clip import ClipBackbone
from ovdense.backbone.dense import METHODS, MethodSpec, block_input_affinity
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.errors import OvdenseError
from ovdense.io import ImageInput, load_image, ordered, overlay, write_image, write_json, write_label_png
from ovdense.kernels.reference import class_max
from ovdense.refine.cluster import cluster_vote, default_dbscan_params
from ovdense.refine.pamr import pamr as pamr_refine

PAMR_DILATIONS = (8, 16)  # ``pamr_stride`` in SCLIP, NACLIP, ClearCLIP and ITACLIP
PAMR_STEPS = 10

MAX_LONG_SIDE = 2048


@dataclass
class SegmentationResult:
    """A segmentation at the input image's resolution.

    Attributes:
        labels: ``[H, W]`` int64 class indices into ``classes``.
        scores: ``[H, W]`` float32 probability of the winning class.
        classes: the class names (each class's first synonym).
        synonyms: each class's words (``()``: the names alone).
        settings: the head's settings that shaped it (``Segmenter.settings()``).
    """

    labels: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = ()
    settings: dict = field(default_factory=dict)

    OUTPUTS = ("_labels.png", "_overlay.jpg", ".json")  # what ``save`` writes, the JSON last
    JSON_KEYS = ("image", "size", "method", "model", "pretrained", "settings", "classes", "seconds")

    def class_shares(self) -> list[float]:
        """The fraction of pixels of each class, in class order."""
        counts = np.bincount(self.labels.reshape(-1), minlength=len(self.classes))
        return [float(c) / self.labels.size for c in counts[: len(self.classes)]]

    def to_json(self, **info) -> dict:
        """The JSON ``ovdense segment`` writes: the size, the method and its settings, each class
        (index, name, synonyms, pixel share), with ``info`` (``image``, ``model``,
        ``pretrained``, ``seconds``, ...) in their places (``JSON_KEYS``)."""
        synonyms = self.synonyms or tuple((name,) for name in self.classes)
        shares = self.class_shares()
        own = {
            "size": list(self.labels.shape),
            "method": self.settings.get("method"),
            "settings": self.settings,
            "classes": [{"index": i, "name": name, "synonyms": list(syn), "pixel_share": shares[i]}
                        for i, (name, syn) in enumerate(zip(self.classes, synonyms))],
        }
        return ordered(self.JSON_KEYS, own, info)

    def overlay(self, image: ImageInput) -> np.ndarray:
        """The labels' colours blended on the image, with a legend: RGB ``uint8 [H, W + 200, 3]``."""
        return overlay(load_image(image), self.labels, self.classes)

    def save(self, out_dir: str | os.PathLike, stem: str, image: ImageInput, /, **info) -> list[Path]:
        """Write ``<stem>_labels.png`` (indexed, the palette), ``<stem>_overlay.jpg`` and
        ``<stem>.json`` (``to_json(**info)``, last) in ``out_dir``."""
        out = Path(out_dir)
        return [write_label_png(out / f"{stem}_labels.png", self.labels),
                write_image(out / f"{stem}_overlay.jpg", self.overlay(image)),
                write_json(out / f"{stem}.json", self.to_json(**info))]


def check_resize_and_window(short_side: int, window: tuple[int, ...], multiple: int = 1) -> None:
    """One clear error for a negative short side, or a window that is not ``(crop, stride)`` of positive
    multiples of ``multiple`` (or ``(0, 0)``: one pass) with the stride at most the crop (else the
    windows would leave gaps): the check every windowed head makes of its settings."""
    if short_side < 0:
        raise OvdenseError(f"short_side must be ≥ 0, got {short_side}")
    if len(window) != 2:
        raise OvdenseError(f"window must be (crop, stride), got {window}")
    crop, stride = window
    if (crop, stride) == (0, 0):
        return
    if crop <= 0 or stride <= 0 or crop % multiple or stride % multiple:
        what = "two positive ints" if multiple == 1 else f"positive multiples of the patch size {multiple}"
        raise OvdenseError(f"window {window}: crop and stride must be {what} (or 0 0)")
    if stride > crop:
        raise OvdenseError(f"window {window}: the stride is larger than the crop, so the windows would "
                           "leave gaps; use a stride ≤ the crop")


def rescale_size(height: int, width: int, short_side: int, long_cap: int = MAX_LONG_SIDE) -> tuple[int, int]:
    """mmcv ``rescale_size`` for ``scale=(long_cap, short_side)``, keep ratio: ``(H', W')``."""
    factor = min(long_cap / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The sliding windows ``(y1, y2, x1, x2)`` of mmseg's ``slide_inference``.

    ``ceil((size - crop) / stride) + 1`` windows per axis; the last one is shifted back to end
    at the border; a crop larger than the image becomes the whole image.
    """
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


class Segmenter:
    """Segment images with any list of classes by a training-free method.

    Every ``None`` argument takes the method's official default (``ovdense methods`` lists
    them; ``dense.METHODS[method].protocol`` holds them); ``templates``, ``short_side`` and
    ``window`` first take the backbone's own defaults if its config has them (the toy model).

    Args:
        backbone: the shared CLIP backbone.
        method: a name from ``ovdense.backbone.dense.METHODS``.
        classes: class names; a string with commas (or a list) gives synonyms, e.g.
            ``["background", "person, man, woman", "dog"]``.
        templates: ``"imagenet80"`` (the default), ``"single"`` or a list of templates with ``{}``.
        short_side: resize the short side to this; ``0`` keeps the size.
        window: ``(crop, stride)`` in pixels; ``(0, 0)`` = one pass over the whole image.
        logit_scale: softmax temperature factor.
        bg_threshold: pixels whose best probability is below it become class 0.
        area_threshold: classes ≥ 1 covering at most this fraction of the non-background
            argmax pixels are dropped (SCLIP/ITACLIP ``area_thd``; VOC21 uses 0.1).
        pamr: refine the logits with PAMR.
        image_engineering: ITACLIP's test-time variants: features averaged over the
            original, grayscale and Gaussian-blurred window (kernel 11, σ = 5), mixed
            ``w : 1 − w`` with the mean logits of its vertical and horizontal flips.
        image_engineering_weight: ``w`` above (``img_eng_coefficient``: 0.75 by default,
            0.7 in ITACLIP's VOC and Cityscapes configs).
        close_labels: ITACLIP's 3×3 morphological closing of the label map.
        cluster: CLIPtrase's cluster vote (DBSCAN on the block-11 affinity).
        cluster_params: DBSCAN ``(eps, min_samples)``; ``None`` = the official pair at 224
            px (14×14 patches: ``(0.7, 3)``) or 336 px (21×21: ``(1.1, 7)``), whichever patch
            count is nearer (ovdense's rule for other sizes; the repo fixes one pair per size).
        definitions: ITACLIP's auxiliary texts, ``{class name: text}`` (definitions, or
            synonyms as in its COCO-Object and Cityscapes files); each prompt of a defined
            class becomes ``(1 − w) · t_name + w · t_text`` (not renormalised, as in the
            official code), ``w = definition_weight``.
        definition_weight: ``w`` above (code default 0.2; configs use 0.05 for VOC and
            Cityscapes, 0.1 for COCO-Object, 0.15 for Context60).
        method_options: extra options of the method's block function (see ``dense``).
        kernel: the last step's path (``ovdense.kernels``): ``"auto"``, ``"torch"``,
            ``"triton"``, or ``"reference"`` (full-resolution logits, for comparison).
        batch_windows: windows sent through the backbone at once.
        vfm: the second vision model of a method that needs one (ProxyCLIP:
            ``ovdense.backbone.vfm.create_vfm("dino_vitb8", weights)``); it sees each window as
            CLIP does (the padding is CLIP's mean colour, as in the official code, which pads the
            CLIP-normalised window with zeros and un-normalises it for the VFM).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        method: str = "clearclip",
        classes: Sequence[ClassSpec] | Vocabulary = (),
        templates: Templates | None = None,
        short_side: int | None = None,
        window: tuple[int, int] | None = None,
        logit_scale: float | None = None,
        bg_threshold: float | None = None,
        area_threshold: float | None = None,
        pamr: bool | None = None,
        image_engineering: bool | None = None,
        image_engineering_weight: float = 0.75,
        close_labels: bool | None = None,
        cluster: bool | None = None,
        cluster_params: tuple[float, int] | None = None,
        definitions: Mapping[str, str] | None = None,
        definition_weight: float = 0.2,
        method_options: dict | None = None,
        kernel: str = "auto",
        batch_windows: int = 16,
        vfm=None,
    ):
        if method not in METHODS:
            raise OvdenseError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
        self.backbone = backbone
        self.method = method
        self.spec: MethodSpec = METHODS[method]
        defaults = self.spec.protocol
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        own = backbone.defaults  # the model's own defaults come before the method's
        self.templates = templates if templates is not None else own.get("templates", "imagenet80")
        if short_side is None:
            short_side = own.get("short_side", defaults.short_side)
        self.short_side = int(short_side)
        if window is None:
            window = own.get("window", defaults.window)
        self.window = tuple(int(v) for v in window)
        self.logit_scale = defaults.logit_scale if logit_scale is None else float(logit_scale)
        self.bg_threshold = bg_threshold
        self.area_threshold = area_threshold
        self.pamr = defaults.pamr if pamr is None else bool(pamr)
        self.image_engineering = _choose(image_engineering, defaults.image_engineering)
        self.image_engineering_weight = float(image_engineering_weight)
        self.close_labels = _choose(close_labels, defaults.close_labels)
        self.cluster = _choose(cluster, defaults.cluster)
        self.cluster_params = cluster_params
        self.definitions = dict(definitions or {})
        self.definition_weight = float(definition_weight)
        self.method_options = dict(method_options or {})
        self.kernel = kernel
        self.batch_windows = int(batch_windows)
        self.vfm = vfm
        self.pad_multiple = defaults.pad_multiple or backbone.patch_size
        self._validate()
        self.text = self._text_features()  # Q, D
        self.class_of_prompt = torch.tensor(self.vocabulary.class_of_prompt, device=backbone.device)

    def _validate(self) -> None:
        if "vfm" in self.spec.needs and self.vfm is None:
            raise OvdenseError(f"{self.method} needs a second vision model: vfm=create_vfm(NAME, WEIGHTS) "
                               "(ovdense.backbone.vfm; CLI --vfm NAME --vfm-weights PATH)")
        if self.vfm is not None and "vfm" not in self.spec.needs:
            raise OvdenseError(f"{self.method} uses no second vision model; vfm= is for "
                               f"{', '.join(m for m, s in METHODS.items() if 'vfm' in s.needs)}")
        if self.vfm is not None and not callable(getattr(self.vfm, "features", None)):
            raise OvdenseError(f"vfm must be a vision model (ovdense.backbone.vfm.create_vfm), got "
                               f"{type(self.vfm).__name__}")
        if self.kernel not in kernels.KERNELS:
            raise OvdenseError(f"unknown kernel {self.kernel!r}; choose from: {', '.join(kernels.KERNELS)}")
        if self.batch_windows < 1:
            raise OvdenseError(f"batch_windows must be ≥ 1, got {self.batch_windows}")
        check_resize_and_window(self.short_side, self.window)
        for name in ("bg_threshold", "area_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise OvdenseError(f"{name} must lie in [0, 1], got {value}")
        if self.logit_scale <= 0:
            raise OvdenseError(f"logit_scale must be positive, got {self.logit_scale}")
        unknown = sorted(set(self.definitions) - set(self.vocabulary.names))
        if unknown:
            raise OvdenseError(
                f"definitions given for unknown classes {unknown}; classes are {list(self.classes)}"
            )
        if not 0.0 <= self.image_engineering_weight <= 1.0:
            raise OvdenseError(
                f"image_engineering_weight must lie in [0, 1], got {self.image_engineering_weight}"
            )
        if not 0.0 <= self.definition_weight <= 1.0:
            raise OvdenseError(f"definition_weight must lie in [0, 1], got {self.definition_weight}")

    def _text_features(self) -> torch.Tensor:
        """``[Q, D]`` prompt features, with ITACLIP's definitions mixed in where given."""
        text = self.backbone.encode_text(self.vocabulary.prompts, self.templates)  # Q, D
        if not self.definitions:
            return text
        names = list(self.definitions)
        described = self.backbone.encode_text([self.definitions[n] for n in names], self.templates)
        row_of = {name: row for row, name in enumerate(names)}
        w = self.definition_weight
        mixed = text.clone()
        for q, c in enumerate(self.vocabulary.class_of_prompt):
            row = row_of.get(self.vocabulary.names[c])
            if row is not None:
                mixed[q] = (1.0 - w) * text[q] + w * described[row]
        return mixed

    @property
    def classes(self) -> tuple[str, ...]:
        return self.vocabulary.names

    def settings(self) -> dict:
        """Every setting that shapes the output (written into the CLI's JSON)."""
        return {
            "method": self.method,
            "templates": self.templates if isinstance(self.templates, str) else list(self.templates),
            "short_side": self.short_side,
            "window": list(self.window),
            "logit_scale": self.logit_scale,
            "bg_threshold": self.bg_threshold,
            "area_threshold": self.area_threshold,
            "pamr": self.pamr,
            "image_engineering": self.image_engineering,
            "image_engineering_weight": self.image_engineering_weight,
            "close_labels": self.close_labels,
            "cluster": self.cluster,
            "cluster_params": list(self.cluster_params) if self.cluster_params else None,
            "definitions": self.definitions,
            "definition_weight": self.definition_weight,
            "method_options": self.method_options,
            "kernel": self.kernel,
            "vfm": None if self.vfm is None else {"name": self.vfm.name, "weights": str(self.vfm.weights)},
        }

    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> SegmentationResult:
        """Segment one image (path, PIL image or RGB array) at its own resolution."""
        rgb = load_image(image)
        x = self.prepare(rgb)  # 1, 3, H', W'
        size = rgb.shape[:2]
        if self.streams:
            windows = self.windows(x)
            labels, scores = kernels.slide_classify(
                windows, tuple(x.shape[-2:]), size, self.class_of_prompt, self.logit_scale,
                self.bg_threshold, self.kernel,
            )
        else:
            labels, scores = self.classify(self.logits(x, size))
        if self.cluster:
            labels = self._cluster_vote(x, labels)
        if self.close_labels:
            labels = close_labels(labels)
        return SegmentationResult(labels.cpu().numpy(), scores.cpu().numpy(), self.classes,
                                  tuple(self.vocabulary.synonyms()), self.settings())

    @property
    def streams(self) -> bool:
        """Whether ``predict`` classifies straight from the windows' low-resolution logits
        (the kernels) instead of the full ``[Q, H, W]`` logits: not with ``kernel="reference"``,
        and not when PAMR or the area threshold need the full logits."""
        return self.kernel != "reference" and not self.pamr and self.area_threshold is None

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize by the short side and normalise: ``[1, 3, H', W']`` on the backbone's device."""
        if self.short_side:
            new_h, new_w = rescale_size(rgb.shape[0], rgb.shape[1], self.short_side)
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        return self.backbone.to_tensor(rgb)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-prompt cosine logits ``[Q, H, W]`` at ``size = (H, W)`` (before the scale): the
        full canvas of the sliding windows, resized; PAMR, if on, is applied here.

        ``x`` is the prepared image ``[1, 3, H', W']``.
        """
        canvas = kernels.slide_canvas_reference(self.windows(x), tuple(x.shape[-2:]))  # Q, H', W'
        logits = F.interpolate(canvas[None], size=size, mode="bilinear", align_corners=False)
        if self.pamr:
            guide = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
            logits = pamr_refine(guide, logits, dilations=PAMR_DILATIONS, num_iter=PAMR_STEPS)
        return logits[0]

    def classify(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Q, H, W]`` cosine logits → labels ``[H, W]`` and winning probabilities ``[H, W]``."""
        probs = torch.softmax(logits.float() * self.logit_scale, dim=0)  # Q, H, W
        C = len(self.vocabulary)
        if len(self.vocabulary.prompts) != C:  # max over each class's synonyms
            class_probs = class_max(probs[None], self.class_of_prompt, C)[0]
        else:
            class_probs = probs
        if self.area_threshold is not None:
            area = torch.bincount(class_probs.argmax(dim=0).flatten(), minlength=C).float()  # C
            area[0] = 0.0
            keep = area > self.area_threshold * area.sum()
            keep[0] = True
            class_probs = class_probs * keep.view(-1, 1, 1)
        scores, labels = class_probs.max(dim=0)  # H, W
        if self.bg_threshold is not None:
            labels = torch.where(scores < self.bg_threshold, torch.zeros_like(labels), labels)
        return labels, scores

    def _cluster_vote(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CLIPtrase's vote on the affinity of the whole prepared image (block 11 of 12)."""
        p = self.backbone.patch_size
        resized = x.shape[-2:]
        x, (top, left) = _pad_to_multiple(x, p)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        affinity = block_input_affinity(self.backbone.model.visual, x, -2)[0]  # N, N
        denoised = (affinity[1:, 1:] - affinity[:1, 1:]).clamp(min=0)  # hw, hw
        eps, min_samples = self.cluster_params or default_dbscan_params(grid[0] * grid[1])
        # the cluster maps cover the padded image: place the labels' region inside it
        sy, sx = labels.shape[0] / resized[0], labels.shape[1] / resized[1]
        canvas = (round(x.shape[-2] * sy), round(x.shape[-1] * sx), round(top * sy), round(left * sx))
        return cluster_vote(denoised, grid, labels, eps, min_samples, canvas=canvas)

    def windows(self, x: torch.Tensor) -> list[kernels.Window]:
        """The low-resolution logits of every window of the prepared image ``x [1, 3, H', W']``.

        Windows follow mmseg's ``slide_inference`` (one window for ``window == (0, 0)``); each
        is zero-padded, centred, to a patch multiple; windows of one shape go through the
        backbone together, ``batch_windows`` at a time.
        """
        crop, stride = self.window
        height, width = x.shape[-2:]
        boxes = window_boxes(height, width, crop, stride) if crop else [(0, height, 0, width)]
        padded, offsets = [], []
        for y1, y2, x1, x2 in boxes:
            tensor, offset = _pad_to_multiple(x[:, :, y1:y2, x1:x2], self.pad_multiple)
            padded.append(tensor)
            offsets.append(offset)
        low: list[torch.Tensor | None] = [None] * len(boxes)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(padded):
            groups.setdefault(tuple(tensor.shape[-2:]), []).append(index)
        for members in groups.values():
            for start in range(0, len(members), self.batch_windows):
                chunk = members[start:start + self.batch_windows]
                batch = torch.cat([padded[i] for i in chunk])  # n, 3, Hp, Wp
                for i, logits in zip(chunk, self._low_logits(batch)):
                    low[i] = logits
        return [
            kernels.Window(box, logits, tuple(padded[i].shape[-2:]), offsets[i])
            for i, (box, logits) in enumerate(zip(boxes, low))
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The method's dense features ``[n, D, h/p, w/p]`` (L2-normalised) of normalised windows whose
        sides are patch multiples (ProxyCLIP: any size, on its VFM's grid, the VFM fed the
        un-normalised window as ``proxyclip_segmentor.py`` feeds it; CLIP's patch embedding drops a
        partial last patch, as its convolution does)."""
        options = self.method_options
        if self.vfm is not None:
            mean = x.new_tensor(self.backbone.mean).view(1, 3, 1, 1)
            std = x.new_tensor(self.backbone.std).view(1, 3, 1, 1)
            options = {**options, "vfm_features": self.vfm.features(x.float() * std + mean)}
            p = self.backbone.patch_size
            x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p]
        return self.backbone.encode_dense(x, self.method, **options)  # n, D, h, w

    def _patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Patch–prompt cosine logits ``[n, Q, h/p, w/p]`` of padded windows."""
        feats = self.features(x)  # n, D, h, w
        return torch.einsum("bdhw,qd->bqhw", feats.float(), self.text.float())

    def _low_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits ``[n, Q, h/p, w/p]`` of windows, engineered if asked."""
        if not self.image_engineering:
            return self._patch_logits(x)
        return torch.cat([self._engineered_logits(one[None]) for one in x])

    def _engineered_logits(self, x: torch.Tensor) -> torch.Tensor:
        """ITACLIP's image engineering (Aydın et al. 2025, §3.3; ``forward_feature`` in
        ``itaclip_segmentor.py``) on one window ``[1, 3, h, w]``: ``[1, Q, h/p, w/p]``.

        Features of the window, its grayscale (on the normalised tensor, as torchvision's
        ``Grayscale``) and its Gaussian blur (kernel 11, σ = 5) are averaged without
        renormalising — equal to averaging their logits; the flips' logits are flipped back and
        averaged; the two are mixed ``w : 1 − w``. The official code mixes after upsampling
        each to the window; bilinear upsampling is linear and commutes with flips, so mixing
        at patch resolution is the same.
        """
        gray = TF.rgb_to_grayscale(x, num_output_channels=1).expand_as(x)
        blurred = TF.gaussian_blur(x, kernel_size=[11, 11], sigma=[5.0, 5.0])
        main = self._patch_logits(torch.cat([x, gray, blurred])).mean(dim=0, keepdim=True)
        flipped = [torch.flip(self._patch_logits(torch.flip(x, dims)), dims) for dims in ((-2,), (-1,))]
        w = self.image_engineering_weight
        return w * main + (1.0 - w) * torch.stack(flipped).mean(dim=0)


def _choose(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)


def _pad_to_multiple(x: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``[B, 3, h, w]`` to multiples of ``p``, centred (``l = pad // 2``, as ClearCLIP's
    ``compute_padsize``): the padded tensor and the ``(top, left)`` offset of the original."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % p, (-w) % p
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        x = F.pad(x, (left, pad_w - left, top, pad_h - top))
    return x, (top, left)


def close_labels(labels: torch.Tensor) -> torch.Tensor:
    """ITACLIP's post-step: morphological closing of the ``[H, W]`` label map with a 3×3
    square (``cv2.MORPH_CLOSE``, i.e. dilation then erosion of the label values)."""
    array = labels.cpu().numpy()
    dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    closed = cv2.morphologyEx(array.astype(dtype), cv2.MORPH_CLOSE, kernel)
    return torch.from_numpy(closed.astype(np.int64)).to(labels.device)
