"""CLIP-DINOiser: MaskCLIP's dense features pooled over patch correlations that two trained
convolutions predict from an intermediate CLIP layer, with a learned background filter.

Wysoczańska, Siméoni, Ramamonjisoa, Bursuc, Trzciński, Pérez, "CLIP-DINOiser: Teaching CLIP a few
DINO tricks for open-vocabulary semantic segmentation", ECCV 2024, §3 (MaskCLIP features; pooling
guided by correlations; background refinement; both learned from CLIP features, DINO and FOUND
being the teachers). Official code: wysoczanska/clip_dinoiser at a954aae (model code of 5fac64e),
cited as ``cd.py`` = ``models/clip_dinoiser/clip_dinoiser.py``, ``mc.py`` =
``models/maskclip/maskclip.py``, the eval wrapper ``segmentation/evaluation/clip_dinoiser_eval.py``
and ``main_eval.py`` (docs/vfm_methods.md describes the method and the differences).

For one window ``x`` (``[B, 3, H, W]`` RGB in ``[0, 1]``; ``h, w = ⌈H/p⌉, ⌈W/p⌉``; ``L`` blocks)::

    x  = normalise(zero-pad x right/bottom to a multiple of p)        # cd.py:68-74, mc.py:123
    t  = blocks 0 … L−2 on embed(x) (position embedding resized to (h, w): bicubic, exact size)
    c  = ln_2 output of block L−3, patch tokens            [B, W, h, w]      # cd.py:251, 260-262
    f  = ln_post(maskclip_value_path(block L−1, t)) @ proj   [B, D, h, w]   # mc.py:68-87, 147-148
    P  = normalise(obj_proj(c)) (3×3 conv, replicate padding)  [B, 256, hw]  # cd.py:265-266
    A  = Pᵀ P, entries < γ set to 0                           [B, hw, hw]    # cd.py:267, 279-280
    f' = (A f) / (Σ A + 1e-6)        (a sum-normalised average of the un-normalised f)  # cd.py:212-214
    prob = softmax(100 · cos(E, f'))                           [B, K, h, w]   # mc.py:187-191
    background (``found_background``): where sigmoid(bkg_decoder(c/‖c‖)) ≤ 0.5 and max prob < δ,
    the probability of class 0 is set to 1.0 (not renormalised)               # cd.py:286-293

``E`` are the class embeddings (80 ImageNet templates, each prompt normalised, averaged,
renormalised: ``mc.py:157-177``, which is ``ClipBackbone.encode_text``). The eval protocol
(``ClipDinoiserSegmenter``) resizes the image to short side 448 and slides 448-pixel windows with
stride 224 (mmseg 0.27 ``slide_inference``), averaging the windows' probabilities.

Departures from the official code, each shown by ``tests/test_clipdinoiser.py``:

* Batch: the official background override (``cd.py:293``, ``output.reshape(1, K, -1)``) is
  written for one image: with several it writes into image 0's channels. Here it applies per
  image, so a batch gives each image's batch-1 result.
* NaN guards: the official divides by norms without an epsilon (``cd.py:266, 268``,
  ``mc.py:188``); here ``F.normalize`` (eps 1e-12): equal unless a norm is below 1e-12, where the
  official output is NaN and this one is finite.
* Synonyms (an ovdense addition): a class with several words scores the max of its words'
  probabilities, the softmax running over every word; one word per class is the official use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.clip import ClipBackbone
from ovdense.backbone.dense import maskclip_block
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.backbone.runner import embed, run_blocks
from ovdense.errors import OvdenseError
from ovdense.heads.head_files import read_head, write_head
from ovdense.heads.training_free import (
    SegmentationResult,
    check_resize_and_window,
    rescale_size,
    window_boxes,
)
from ovdense.io import ImageInput, load_image
from ovdense.kernels.reference import class_max

HEAD_FORMAT = "ovdense-clipdinoiser-head-v1"
CONVERTER = "tools/model_converters/clipdinoiser2ovdense.py"
OFFICIAL_CHECKPOINT = "checkpoints/last.pt"
LOGIT_SCALE = 100.0  # mc.py:190, hard-coded (not the model's logit_scale)
POS_RESIZE = "size"  # mc.py:113-114: bicubic to the exact grid, align_corners=False
TAP_KIND = "ln_2"  # cd.py:251: the hook sits on the block's ln_2 (the MLP's input)
BACKGROUND = "background"
#: the official eval protocol (dataset configs ``segmentation/configs/_base_/datasets/*.py``)
SHORT_SIDE = 448  # img_scale=(2048, 448), keep_ratio
WINDOW = (448, 224)  # test_cfg: crop_size 448, stride 224
GAMMA = 0.2  # configs/clip_dinoiser.yaml: gamma
DELTA = 0.99  # configs/clip_dinoiser.yaml: delta


@dataclass(frozen=True)
class ClipDinoiserConfig:
    """The trained part's shape (``CLIP_DINOiser.__init__``, ``cd.py:228-239``).

    Attributes:
        tap: the block whose ``ln_2`` output feeds the convolutions (``feats_idx``, −3: block 9
            of ViT-B/16's 12); negative counts from the end; one of blocks ``0 … L − 2`` (the last
            block gives the MaskCLIP features).
        proj_dim: ``obj_proj``'s output channels (``in_dim``, 256).
        kernel: ``obj_proj``'s kernel size (``conv_kernel``, 3; padding ``kernel // 2``, replicate).
    """

    tap: int = -3
    proj_dim: int = 256
    kernel: int = 3

    def block(self, num_layers: int) -> int:
        """The tap's 0-based block index in a tower of ``num_layers`` blocks."""
        index = self.tap + num_layers if self.tap < 0 else self.tap
        if not 0 <= index <= num_layers - 2:
            raise OvdenseError(f"CLIP-DINOiser's tap {self.tap} is not a block in [0, {num_layers - 2}] of "
                               f"this {num_layers}-block tower (the last block gives the MaskCLIP features)")
        return index

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClipDinoiserConfig:
        return cls(**json.loads(text))


class ClipDinoiserHead(nn.Module):
    """What CLIP-DINOiser trains: ``obj_proj`` (``Conv2d(W, 256, 3, padding=1,
    padding_mode="replicate")``) and ``bkg_decoder`` (``Conv2d(W, 1, 1)``), named as in
    ``cd.py:237-239`` (the official ``in_size`` is 768, ViT-B/16's width; here the backbone's
    width). The backbone stays the caller's and never enters the state dict."""

    def __init__(self, backbone: ClipBackbone, config: ClipDinoiserConfig | None = None):
        super().__init__()
        self.config = config or ClipDinoiserConfig()
        c = self.config
        if c.proj_dim < 1 or c.kernel < 1 or c.kernel % 2 == 0:
            raise OvdenseError(f"CLIP-DINOiser needs proj_dim ≥ 1 and an odd kernel, got {c.proj_dim}, "
                               f"{c.kernel}")
        self.tap_block = c.block(backbone.num_layers)
        width = backbone.width
        self.bkg_decoder = nn.Conv2d(width, 1, (1, 1))
        self.obj_proj = nn.Conv2d(width, c.proj_dim, (c.kernel, c.kernel), padding=c.kernel // 2,
                                  padding_mode="replicate")

    def features(self, backbone: ClipBackbone, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One CLIP pass over normalised windows ``x [B, 3, H, W]`` (multiples of ``p``).

        Returns:
            ``f [B, D, h, w]``: MaskCLIP's features, not normalised (``mc.py:49-76``, ``179-185``:
            block L−2's output through the last block's value path with its residual and FFN,
            ``ln_post``, ``proj``; ``dense.maskclip_block(keep_residual=True)`` is that path), and
            ``c [B, W, h, w]``: the tap block's ``ln_2`` output, patch tokens (``cd.py:247, 260-262``).
        """
        visual = backbone.model.visual
        L = backbone.num_layers
        B, _, H, W = x.shape
        h, w = H // backbone.patch_size, W // backbone.patch_size
        tokens = embed(visual, x, resize=POS_RESIZE)  # B, 1+hw, W
        tokens, taps = run_blocks(visual, tokens, 0, L - 1, taps=[(self.tap_block, TAP_KIND)])
        v = maskclip_block(visual.transformer.resblocks[L - 1], tokens, (h, w), keep_residual=True)
        f = visual.ln_post(v[:, 1:]) @ visual.proj  # B, hw, D
        f = f.float().transpose(1, 2).reshape(B, -1, h, w)  # B, D, h, w
        c = taps[(self.tap_block, TAP_KIND)][:, 1:].float().transpose(1, 2).reshape(B, -1, h, w)  # B, W, h, w
        return f, c

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_pass`` (``cd.py:255-271``) on the tap ``c [B, W, h, w]``: the background
        logits ``[B, 1, h, w]`` (``bkg_decoder`` on the L2-normalised tap) and the patch
        correlations ``A [B, hw, hw]`` (cosines of ``obj_proj``'s output; not thresholded)."""
        B = c.shape[0]
        P = F.normalize(self.obj_proj(c).reshape(B, self.config.proj_dim, -1), dim=1)  # B, 256, hw
        A = P.transpose(1, 2) @ P  # B, hw, hw
        bkg = self.bkg_decoder(F.normalize(c, dim=1))  # B, 1, h, w
        return bkg, A


def pool(f: torch.Tensor, A: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """``compute_weighted_pool`` (``cd.py:192-218``) after the threshold (``cd.py:279-280``):
    ``f [B, D, h, w]``, ``A [B, hw, hw]`` → ``f'[b, :, n] = Σ_m A'[n, m] f[:, m] / (Σ_m A'[n, m] + 1e-6)``,
    ``A'`` = ``A`` with entries below ``gamma`` set to 0 (negatives too; no threshold at all when
    ``gamma`` is 0 or ``None``, as the official ``if self.gamma``). ``[B, D, h, w]``."""
    B, D, h, w = f.shape
    if gamma:
        A = torch.where(A < gamma, torch.zeros_like(A), A)
    pooled = f.reshape(B, D, h * w) @ A.transpose(1, 2)  # B, D, hw
    return (pooled / (A.sum(dim=-1)[:, None] + 1e-6)).reshape(B, D, h, w)


# --------------------------------------------------------------------------------------------
# Head files


def save_head(path: str | Path, head: ClipDinoiserHead, backbone: ClipBackbone,
              dtype: torch.dtype | None = None) -> Path:
    """Write the head as safetensors (atomically) with its format, backbone name and identity,
    config and the ovdense version (``head_files.write_head``)."""
    return write_head(path, head, backbone, HEAD_FORMAT, dtype)


def load_head(path: str | Path, backbone: ClipBackbone) -> ClipDinoiserHead:
    """Read a head written by ``save_head`` for this backbone (never unpickles anything).

    Raises:
        OvdenseError: not a CLIP-DINOiser head, another backbone, or keys and shapes that do not fit.
    """
    return read_head(path, backbone, HEAD_FORMAT, "CLIP-DINOiser",
                     lambda config: ClipDinoiserHead(backbone, ClipDinoiserConfig.from_json(config)),
                     CONVERTER, "ovdense.heads.clipdinoiser.save_head")


def default_head_checkpoint(backbone: ClipBackbone) -> Path:
    """No CLIP-DINOiser head ships with ovdense: always one ``OvdenseError`` saying how to get one."""
    raise OvdenseError(
        f"CLIP-DINOiser needs its trained convolutions for {backbone.name}: convert the official "
        f"{OFFICIAL_CHECKPOINT} (wysoczanska/clip_dinoiser, for ViT-B-16 laion2b_s34b_b88k) with "
        f"{CONVERTER} and pass head_checkpoint=PATH (CLI --head-checkpoint)")


# --------------------------------------------------------------------------------------------
# Inference


class ClipDinoiserSegmenter:
    """Segment images with CLIP-DINOiser by the official eval protocol (the shape of ``Segmenter``).

    Protocol (``main_eval.py``, the dataset configs, ``clip_dinoiser_eval.py`` on mmseg 0.27):
    the image resized so its short side is 448 (long side at most 2048; mmcv ``imrescale``,
    bilinear on ``uint8``), RGB in ``[0, 1]`` (the model normalises after padding); windows of 448
    with stride 224 (``window_boxes``); each window's probabilities ``[K, ⌈h/p⌉, ⌈w/p⌉]``
    stretched bilinearly to the window's (unpadded) size and averaged where windows overlap;
    the average resized bilinearly to the image; ``labels`` = argmax (mmseg's final softmax
    does not change it), ``scores`` = the winning class's averaged probability.

    ``None`` takes the official default; ``templates``, ``short_side`` and ``window`` first take the
    backbone's own defaults where its config has them (only the toy model's does; as ``Segmenter``).

    Args:
        backbone: the backbone the head was trained on (the official: ``ViT-B-16``,
            ``laion2b_s34b_b88k``).
        classes: class names; a string with commas (or a list) gives synonyms (max over words).
        head_checkpoint: a file written by ``save_head`` (``tools/model_converters/
            clipdinoiser2ovdense.py`` converts the official ``checkpoints/last.pt``); or pass ``head``.
        head: a ``ClipDinoiserHead`` in memory.
        templates: ``None`` = CLIP's 80 ImageNet templates (``use_templates: True``,
            ``configs/maskclip.yaml``).
        short_side: resize the short side to this; ``0`` keeps the size; ``None`` = 448.
        window: ``(crop, stride)``; ``(0, 0)`` = one pass over the whole image; ``None`` = (448, 224).
        bg_threshold: pixels whose winning averaged probability is below it become class 0 (an
            ovdense option; the official has none). ``None``: plain argmax.
        found_background: the learned background filter (``apply_found``) on class 0; ``None`` =
            on iff class 0 is named ``"background"`` (``demo.py:95-98``). The official eval turns it
            on for VOC and COCO-Object only (``main_eval.py:38-40``): pass ``False`` for Context60.
        gamma: the correlation threshold γ (0.2); 0 = none (the official ``if self.gamma``).
        delta: the confidence δ below which a pixel may become background (0.99).
        batch_windows: windows of one shape sent through the backbone together.
    """

    method = "clipdinoiser"

    def __init__(
        self,
        backbone: ClipBackbone,
        classes: Sequence[ClassSpec] | Vocabulary = (),
        head_checkpoint: str | Path | None = None,
        head: ClipDinoiserHead | None = None,
        templates: Templates | None = None,
        short_side: int | None = None,
        window: tuple[int, int] | None = None,
        bg_threshold: float | None = None,
        found_background: bool | None = None,
        gamma: float | None = None,
        delta: float | None = None,
        batch_windows: int = 8,
    ):
        if head is not None and head_checkpoint is not None:
            raise OvdenseError("CLIP-DINOiser takes one trained head: pass head_checkpoint=PATH or head=, "
                               "not both")
        if head is None and head_checkpoint is None:
            default_head_checkpoint(backbone)  # raises, naming the official file and the converter
        self.backbone = backbone
        self.head = load_head(head_checkpoint, backbone) if head is None else head
        self.head.eval()
        self.head_checkpoint = str(head_checkpoint) if head_checkpoint is not None else None
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        own = backbone.defaults  # the model's own (only the toy model has them) before the official
        self.templates = templates if templates is not None else own.get("templates", "imagenet80")
        self.short_side = int(own.get("short_side", SHORT_SIDE) if short_side is None else short_side)
        self.window = tuple(int(v) for v in (own.get("window", WINDOW) if window is None else window))
        self.bg_threshold = bg_threshold
        if found_background is None:
            found_background = self.vocabulary.names[0] == BACKGROUND
        self.found_background = bool(found_background)
        self.gamma = GAMMA if gamma is None else float(gamma)
        self.delta = DELTA if delta is None else float(delta)
        self.batch_windows = int(batch_windows)
        self._validate()
        self.text = backbone.encode_text(self.vocabulary.prompts, self.templates).float()  # Q, D
        self.class_of_prompt = torch.tensor(self.vocabulary.class_of_prompt, device=backbone.device)

    def _validate(self) -> None:
        check_resize_and_window(self.short_side, self.window)
        if self.bg_threshold is not None and not 0.0 <= self.bg_threshold <= 1.0:
            raise OvdenseError(f"bg_threshold must lie in [0, 1], got {self.bg_threshold}")
        if not -1.0 <= self.gamma <= 1.0:
            raise OvdenseError(f"gamma (a cosine threshold) must lie in [-1, 1], got {self.gamma}")
        if not 0.0 <= self.delta <= 1.0:
            raise OvdenseError(f"delta (a probability) must lie in [0, 1], got {self.delta}")
        if self.batch_windows < 1:
            raise OvdenseError(f"batch_windows must be ≥ 1, got {self.batch_windows}")

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
            "window": list(self.window),
            "bg_threshold": self.bg_threshold,
            "found_background": self.found_background,
            "gamma": self.gamma,
            "delta": self.delta,
            "clipdinoiser_config": json.loads(self.head.config.to_json()),
        }

    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The official ``CLIP_DINOiser.forward`` (``cd.py:273-295``) on windows ``x [B, 3, H, W]``
        (RGB in ``[0, 1]``, any size): class probabilities ``[B, C, ⌈H/p⌉, ⌈W/p⌉]``, class 0 set to
        1.0 where the background filter fires (per image; see the module's departures)."""
        p = self.backbone.patch_size
        x = x.to(self.backbone.device, torch.float32)
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p), value=0.0)  # cd.py:68-74, in [0, 1]
        x = self.backbone.normalize(x).to(self.backbone.dtype)  # mc.py:123
        f, c = self.head.features(self.backbone, x)  # B, D, h, w; B, W, h, w
        bkg, A = self.head(c)  # B, 1, h, w; B, hw, hw
        pooled = F.normalize(pool(f, A, self.gamma), dim=1)  # B, D, h, w
        logits = LOGIT_SCALE * torch.einsum("bdhw,qd->bqhw", pooled, self.text)  # B, Q, h, w
        probs = self._class_probabilities(torch.softmax(logits, dim=1))  # B, C, h, w
        if self.found_background:
            foreground = torch.sigmoid(bkg[:, 0]) > 0.5  # B, h, w
            uncertain = probs.max(dim=1).values < self.delta  # B, h, w
            probs[:, 0] = torch.where(uncertain & ~foreground, torch.ones_like(probs[:, 0]), probs[:, 0])
        return probs

    def _class_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """``[B, Q, h, w]`` word probabilities → ``[B, C, h, w]``: max over each class's words."""
        C = len(self.vocabulary)
        return probs if probs.shape[1] == C else class_max(probs, self.class_of_prompt, C)

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize by the short side (mmcv ``imrescale``, ``cv2.INTER_LINEAR``): ``[1, 3, H', W']``
        RGB in ``[0, 1]`` (``ImageToTensorV2``: ``/255``, no normalisation) on the backbone's device."""
        if self.short_side:
            new_h, new_w = rescale_size(rgb.shape[0], rgb.shape[1], self.short_side)
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        x = torch.as_tensor(np.array(rgb)).to(self.backbone.device)
        return x.permute(2, 0, 1)[None].float() / 255.0  # 1, 3, H', W'

    @torch.inference_mode()
    def canvas(self, x: torch.Tensor) -> torch.Tensor:
        """mmseg 0.27 ``slide_inference`` over ``x [1, 3, H', W']``: the windows' probabilities,
        each resized bilinearly to its window (``encode_decode``: the padded grid stretched to the
        unpadded window), summed and divided by the windows covering each pixel: ``[C, H', W']``."""
        crop, stride = self.window
        height, width = x.shape[-2:]
        boxes = window_boxes(height, width, crop, stride) if crop else [(0, height, 0, width)]
        total = x.new_zeros((len(self.vocabulary), height, width))
        count = x.new_zeros((1, height, width))
        groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        for box in boxes:
            groups.setdefault((box[1] - box[0], box[3] - box[2]), []).append(box)
        for size, members in groups.items():
            for start in range(0, len(members), self.batch_windows):
                chunk = members[start:start + self.batch_windows]
                batch = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # n, 3, h, w
                probs = F.interpolate(self.dense(batch), size=size, mode="bilinear", align_corners=False)
                for (y1, y2, x1, x2), window in zip(chunk, probs):
                    total[:, y1:y2, x1:x2] += window
                    count[:, y1:y2, x1:x2] += 1
        return total / count

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> SegmentationResult:
        """Segment one image (path, PIL image or RGB array) at its own resolution."""
        rgb = load_image(image)
        canvas = self.canvas(self.prepare(rgb))  # C, H', W'
        scores, labels = resize_max(canvas, rgb.shape[:2])  # H, W
        if self.bg_threshold is not None:
            labels = torch.where(scores < self.bg_threshold, torch.zeros_like(labels), labels)
        return SegmentationResult(labels.cpu().numpy(), scores.float().cpu().numpy(), self.classes,
                                  tuple(self.vocabulary.synonyms()), self.settings())


def resize_max(canvas: torch.Tensor, size: tuple[int, int],
               chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The max and argmax over classes of ``canvas [C, H', W']`` resized bilinearly
    (``align_corners=False``) to ``size``: ``[H, W]`` each, ``chunk`` classes resized at a time
    (never the whole ``[C, H, W]``); ties go to the lower class, as ``argmax``."""
    best = labels = None
    for start in range(0, canvas.shape[0], chunk):
        part = F.interpolate(canvas[None, start:start + chunk], size=tuple(size), mode="bilinear",
                             align_corners=False)[0]  # c, H, W
        value, index = part.max(dim=0)
        if best is None:
            best, labels = value, index
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index + start, labels)
    return best, labels
