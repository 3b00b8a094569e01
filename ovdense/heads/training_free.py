"""Training-free open-vocabulary segmentation: the ``Segmenter`` and its inference protocol.

The protocol is the official repos' (SCLIP ``clip_segmentor.py``, ClearCLIP and NACLIP
``*_segmentor.py``/``naclip.py``, all on mmseg 1.x):

1. resize so the short side is ``short_side`` (long side capped at 2048, mmcv's ``imrescale``
   rule with bilinear interpolation);
2. sliding windows of ``window = (crop, stride)``: each window's patch–prompt cosine logits
   are upsampled bilinearly to the window, summed on the canvas and divided by the number of
   windows covering each pixel;
3. the canvas is resized bilinearly to the original image (optionally refined by PAMR);
4. ``softmax(logit_scale · logits)`` over all ``Q`` prompts (every synonym of every class); a
   class's probability is the max over its synonyms; the label is the argmax over classes;
5. pixels whose best probability is below ``bg_threshold`` become class 0 (background).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovdense.backbone.clip import ClipBackbone
from ovdense.backbone.dense import METHODS, MethodSpec
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.errors import OvdenseError
from ovdense.io import ImageInput, load_image
from ovdense.refine.pamr import pamr as pamr_refine

MAX_LONG_SIDE = 2048


@dataclass
class SegmentationResult:
    """A segmentation at the input image's resolution.

    Attributes:
        labels: ``[H, W]`` int64 class indices into ``classes``.
        scores: ``[H, W]`` float32 probability of the winning class.
        classes: the class names (each class's first synonym).
    """

    labels: np.ndarray
    scores: np.ndarray
    classes: tuple[str, ...]

    def class_shares(self) -> list[float]:
        """The fraction of pixels of each class, in class order."""
        counts = np.bincount(self.labels.reshape(-1), minlength=len(self.classes))
        return [float(c) / self.labels.size for c in counts[: len(self.classes)]]


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

    Args:
        backbone: the shared CLIP backbone.
        method: a name from ``ovdense.backbone.dense.METHODS``.
        classes: class names; a string with commas (or a list) gives synonyms, e.g.
            ``["background", "person, man, woman", "dog"]``.
        templates: ``"imagenet80"``, ``"single"`` or a list of templates with ``{}``.
        short_side: resize the short side to this; ``0`` keeps the size; ``None`` = the
            method's official default.
        window: ``(crop, stride)`` in pixels; ``(0, 0)`` = one pass over the whole image;
            ``None`` = the method's default.
        logit_scale: softmax temperature factor; ``None`` = the method's default.
        bg_threshold: pixels whose best probability is below it become class 0.
        pamr: refine the logits with PAMR; ``None`` = the method's default.
        method_options: extra options of the method (see its function in ``dense``).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        method: str = "clearclip",
        classes: Union[Sequence[ClassSpec], Vocabulary] = (),
        templates: Templates = "imagenet80",
        short_side: Optional[int] = None,
        window: Optional[tuple[int, int]] = None,
        logit_scale: Optional[float] = None,
        bg_threshold: Optional[float] = None,
        pamr: Optional[bool] = None,
        method_options: Optional[dict] = None,
    ):
        if method not in METHODS:
            raise OvdenseError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
        self.backbone = backbone
        self.method = method
        self.spec: MethodSpec = METHODS[method]
        defaults = self.spec.protocol
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        self.templates = templates
        self.short_side = defaults.short_side if short_side is None else int(short_side)
        self.window = tuple(defaults.window if window is None else window)
        self.logit_scale = defaults.logit_scale if logit_scale is None else float(logit_scale)
        self.bg_threshold = bg_threshold
        self.pamr = defaults.pamr if pamr is None else bool(pamr)
        self.method_options = dict(method_options or {})
        self._validate()
        self.text = backbone.encode_text(self.vocabulary.prompts, templates)  # Q, D
        self.class_of_prompt = torch.tensor(self.vocabulary.class_of_prompt, device=backbone.device)

    def _validate(self) -> None:
        if self.short_side < 0:
            raise OvdenseError(f"short_side must be ≥ 0, got {self.short_side}")
        crop, stride = self.window
        if (crop, stride) != (0, 0) and (crop <= 0 or stride <= 0):
            raise OvdenseError(f"window must be two positive ints (or 0 0), got {self.window}")
        if crop and crop % self.backbone.patch_size:
            raise OvdenseError(
                f"window {crop} is not a multiple of the patch size {self.backbone.patch_size}"
            )
        if self.bg_threshold is not None and not 0.0 <= self.bg_threshold <= 1.0:
            raise OvdenseError(f"bg_threshold must lie in [0, 1], got {self.bg_threshold}")
        if self.logit_scale <= 0:
            raise OvdenseError(f"logit_scale must be positive, got {self.logit_scale}")

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
            "pamr": self.pamr,
            "method_options": self.method_options,
        }

    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> SegmentationResult:
        """Segment one image (path, PIL image or RGB array) at its own resolution."""
        rgb = load_image(image)
        logits = self.predict_logits(rgb)  # Q, H, W
        labels, scores = self.classify(logits)
        return SegmentationResult(labels.cpu().numpy(), scores.cpu().numpy(), self.classes)

    @torch.inference_mode()
    def predict_logits(self, rgb: np.ndarray) -> torch.Tensor:
        """Per-prompt cosine logits ``[Q, H, W]`` at the image's resolution (before the scale)."""
        height, width = rgb.shape[:2]
        resized = rgb
        if self.short_side:
            new_h, new_w = rescale_size(height, width, self.short_side)
            resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        x = self.backbone.to_tensor(resized)  # 1, 3, H', W'
        canvas = self._slide(x)  # 1, Q, H', W'
        logits = F.interpolate(canvas, size=(height, width), mode="bilinear", align_corners=False)
        if self.pamr:
            full = self.backbone.to_tensor(rgb).float()  # 1, 3, H, W
            logits = pamr_refine(full, logits, **self.spec.pamr_options)
        return logits[0]

    def classify(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Q, H, W]`` cosine logits → labels ``[H, W]`` and winning probabilities ``[H, W]``."""
        probs = torch.softmax(logits.float() * self.logit_scale, dim=0)  # Q, H, W
        C = len(self.vocabulary)
        if len(self.vocabulary.prompts) != C:  # max over each class's synonyms
            class_probs = probs.new_full((C,) + probs.shape[1:], -1.0)
            index = self.class_of_prompt.view(-1, 1, 1).expand_as(probs)
            class_probs = class_probs.scatter_reduce(0, index, probs, reduce="amax")
        else:
            class_probs = probs
        scores, labels = class_probs.max(dim=0)  # H, W
        if self.bg_threshold is not None:
            labels = torch.where(scores < self.bg_threshold, torch.zeros_like(labels), labels)
        return labels, scores

    def _window_logits(self, crop: torch.Tensor) -> torch.Tensor:
        """Cosine logits of one window ``[1, 3, h, w]`` upsampled to the window: ``[1, Q, h, w]``."""
        p = self.backbone.patch_size
        h, w = crop.shape[-2:]
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:  # windows smaller than a patch multiple are zero-padded, then cut
            crop = F.pad(crop, (0, pad_w, 0, pad_h))
        feats = self.backbone.encode_dense(crop, self.method, **self.method_options)  # 1, D, h/p, w/p
        logits = torch.einsum("bdhw,qd->bqhw", feats.float(), self.text.float())  # 1, Q, h/p, w/p
        logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)
        return logits[:, :, :h, :w]

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        """The sliding-window canvas ``[1, Q, H, W]`` (or one pass if ``window == (0, 0)``)."""
        crop, stride = self.window
        height, width = x.shape[-2:]
        if crop == 0:
            return self._window_logits(x)
        canvas = x.new_zeros((1, self.text.shape[0], height, width), dtype=torch.float32)
        count = x.new_zeros((1, 1, height, width), dtype=torch.float32)
        for y1, y2, x1, x2 in window_boxes(height, width, crop, stride):
            canvas[:, :, y1:y2, x1:x2] += self._window_logits(x[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
        return canvas / count
