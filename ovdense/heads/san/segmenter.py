"""SAN heads on disk (safetensors, checked against the backbone) and the ``SanSegmenter``
that segments images with one (Xu et al., CVPR 2023; the package doc has the equations)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovdense.backbone.clip import ASSETS, TOY_NAME, ClipBackbone
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.errors import OvdenseError
from ovdense.heads.head_files import read_head, write_head
from ovdense.heads.san.model import HEAD_FORMAT, TEST_LONG_SIDE, VILD_TEMPLATES, SanConfig, SanHead
from ovdense.heads.training_free import SegmentationResult, rescale_size
from ovdense.io import ImageInput, load_image

# --------------------------------------------------------------------------------------------
# Checkpoints


def save_head(path: str | Path, head: SanHead, backbone: ClipBackbone,
              dtype: torch.dtype | None = None) -> Path:
    """Write the head as safetensors (atomically) with string metadata: format, backbone name,
    its identity (``ClipBackbone.identity``), the SanConfig as JSON and the ovdense version
    (``head_files.write_head``). ``dtype`` (e.g. ``torch.float16``, half the file) stores the
    floating tensors in that type; ``load_head`` casts them back to the head's own."""
    return write_head(path, head, backbone, HEAD_FORMAT, dtype)


def load_head(path: str | Path, backbone: ClipBackbone) -> SanHead:
    """Read a head written by ``save_head`` for this backbone (never unpickles anything).

    Raises:
        OvdenseError: not a safetensors SAN head, another backbone, missing/unexpected keys or
            a tensor of the wrong shape; each message says which and what to do.
    """
    return read_head(path, backbone, HEAD_FORMAT, "SAN",
                     lambda config: SanHead(backbone, SanConfig.from_json(config)),
                     "tools/model_converters/san2ovdense.py", "ovdense.heads.san.save_head")


# --------------------------------------------------------------------------------------------
# Inference


TOY_HEAD_FILE = "san-toy-head.safetensors"


def default_head_checkpoint(backbone: ClipBackbone) -> Path:
    """The head that ships with ovdense for ``backbone``: only the toy model has one
    (``ovdense/assets/san-toy-head.safetensors``, trained by ``configs/san/san_toy_synthetic.py``
    on the toy world's base classes)."""
    if backbone.name == TOY_NAME:
        path = ASSETS / TOY_HEAD_FILE
        if path.is_file():
            return path
        raise OvdenseError(f"the toy SAN head is missing from this install ({path}); reinstall ovdense "
                           "or train one: python tools/train.py configs/san/san_toy_synthetic.py")
    raise OvdenseError(
        f"SAN needs a trained head for {backbone.name}: pass head_checkpoint=PATH (CLI "
        "--head-checkpoint): train one with tools/train.py configs/san/..., or convert the published "
        "weights with tools/model_converters/san2ovdense.py; only the toy model ships a head"
    )


class SanSegmenter:
    """Segment images with any list of classes by a trained SAN head (the shape of ``Segmenter``).

    Protocol (official ``san.py`` inference, ``MIN_SIZE_TEST`` 640, ``MAX_SIZE_TEST`` 2560):
    resize the short side to ``short_side`` (long side capped at 2560, bilinear), normalise,
    zero-pad bottom/right to a multiple of ``size_divisor``, one whole-image pass; the last side
    layer's mask logits are upsampled to the padded size, cut back, resized to the original
    image, then ``S_c = Σ_q softmax(logits)_c · sigmoid(mask_q)``; labels = argmax, scores = the
    winning class's share ``S_c / Σ_c' S_c'``.

    Args:
        backbone: the shared backbone the head was trained on.
        classes: class names; a string with commas (or a list) gives synonyms.
        head_checkpoint: a file written by ``save_head``; or pass ``head``; neither: the head
            that ships for this backbone (``default_head_checkpoint``: the toy model's).
        head: a ``SanHead`` in memory (e.g. during training).
        templates: prompt templates; ``None`` = the backbone's own (the toy model) or ViLD's.
        short_side: ``None`` = the backbone's own default (the toy model) or 640.
    """

    method = "san"

    def __init__(
        self,
        backbone: ClipBackbone,
        classes: Sequence[ClassSpec] | Vocabulary = (),
        head_checkpoint: str | Path | None = None,
        head: SanHead | None = None,
        templates: Templates | None = None,
        short_side: int | None = None,
    ):
        if head is not None and head_checkpoint is not None:
            raise OvdenseError("SAN takes one trained head: pass head_checkpoint=PATH or head=, not both")
        if head is None and head_checkpoint is None:
            head_checkpoint = default_head_checkpoint(backbone)
        self.backbone = backbone
        self.head = load_head(head_checkpoint, backbone) if head is None else head
        self.head.eval()
        self.head_checkpoint = str(head_checkpoint) if head_checkpoint is not None else None
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        own = backbone.defaults
        self.templates = templates if templates is not None else own.get("templates", list(VILD_TEMPLATES))
        self.short_side = int(short_side if short_side is not None else own.get("short_side", 640))
        if self.short_side < 0:
            raise OvdenseError(f"short_side must be ≥ 0, got {self.short_side}")
        self.text = backbone.encode_text(self.vocabulary.prompts, self.templates)  # P, D
        self.class_of_prompt = torch.tensor(self.vocabulary.class_of_prompt, device=backbone.device)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.vocabulary.names

    def settings(self) -> dict:
        """Every setting that shapes the output (written into the CLI's JSON)."""
        return {
            "method": self.method,
            "head_checkpoint": self.head_checkpoint,
            "templates": self.templates if isinstance(self.templates, str) else list(self.templates),
            "short_side": self.short_side,
            "san_config": json.loads(self.head.config.to_json()),
        }

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize by the short side (long side ≤ 2560) and normalise: ``[1, 3, H', W']``."""
        if self.short_side:
            new_h, new_w = rescale_size(rgb.shape[0], rgb.shape[1], self.short_side, TEST_LONG_SIDE)
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        return self.backbone.to_tensor(rgb)

    @torch.inference_mode()
    def class_scores(self, rgb: np.ndarray) -> torch.Tensor:
        """Semantic scores ``[C, H, W]`` at the image's resolution (max over each class's synonyms)."""
        x = self.prepare(rgb)  # 1, 3, h, w
        h, w = x.shape[-2:]
        d = self.head.config.size_divisor
        x = F.pad(x, (0, (-w) % d, 0, (-h) % d))  # 1, 3, H_pad, W_pad (zeros after normalising)
        out = self.head(self.backbone, x, self.text.to(x.device), all_layers=False)[-1]
        masks = F.interpolate(out.mask_logits.float(), size=x.shape[-2:], mode="bilinear",
                              align_corners=False)  # 1, Q, H_pad, W_pad
        masks = F.interpolate(masks[..., :h, :w], size=rgb.shape[:2], mode="bilinear",
                              align_corners=False)  # 1, Q, H, W
        probs = torch.softmax(out.class_logits.float(), dim=-1)[0, :, :-1]  # Q, P
        scores = torch.einsum("qp,qhw->phw", probs, masks[0].sigmoid())  # P, H, W
        C = len(self.vocabulary)
        if scores.shape[0] != C:  # max over each class's synonyms
            scores_by_prompt = scores
            index = self.class_of_prompt.view(-1, 1, 1).expand_as(scores)
            scores = scores.new_full((C,) + scores.shape[1:], -1.0)
            scores = scores.scatter_reduce(0, index, scores_by_prompt, reduce="amax")  # C, H, W
        return scores

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> SegmentationResult:
        """Segment one image (path, PIL image or RGB array) at its own resolution."""
        rgb = load_image(image)
        scores = self.class_scores(rgb)  # C, H, W
        best, labels = scores.max(dim=0)
        share = best / scores.sum(dim=0).clamp_min(1e-12)
        return SegmentationResult(labels.cpu().numpy(), share.float().cpu().numpy(), self.classes,
                                  tuple(self.vocabulary.synonyms()), self.settings())


def head_parameters(head: SanHead) -> int:
    """The number of trained parameters."""
    return sum(p.numel() for p in head.parameters())
