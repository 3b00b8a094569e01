"""CLIPer's early-layer fusion: training-free open-vocabulary segmentation from the attention maps and
patch embeddings of CLIP's early blocks (Sun et al., "CLIPer: Hierarchically Improving Spatial
Representation of CLIP for Open-Vocabulary Semantic Segmentation", ICCV 2025, arXiv 2411.13836).

The code is the reference: linsun449/cliper.code at c05fa41, run as ``ovs/main_ovs.py`` runs it with
``--refinement None``. Short names: ``model.py`` = ``modified_clip/model.py`` (class ``CLIPer``),
``pipeline.py`` = ``ovs/pipeline.py``, ``miou.py`` = ``util/miou.py``. The paper's second module, the
fine-grained compensation with Stable Diffusion 2.1's self-attention maps (``pipeline.py:61-108``, the
default ``--refinement SFSA``), is **out of scope**: the output here is the official output without it
(the README's figures in parentheses).

1. Resize (``model.py:155-163``): the short side to ``short_side``, both sides rounded half-up to a
   multiple of the patch size ``p``, PIL bicubic on the ``uint8`` image; no crop, no padding, no cap on
   the long side. Then OpenAI's mean and std (the backbone's).
2. Encode (``model.py:94-138``, ``fuse_feature=True`` and ``attn_type="fused-attn"``, the
   ``util/args.py`` defaults that override every YAML): position embeddings resized bilinearly to the
   grid, then rounded to fp16 (``model.py:174``, also in fp32 runs). Blocks ``0..L-2`` run as they are;
   their ``ln_1`` outputs ``F_0..F_{L-2}`` and the raw input ``F_{L-1}`` of the last block are kept, and
   their per-head attention maps ``softmax(q kᵀ/√d)`` are summed into ``S``. For ``k = 0..L-1`` one
   Sinkhorn step (column- then row-normalise) is applied to ``S`` *cumulatively*, so feature ``F_k``
   sees ``k + 1`` steps (``model.py:59-60`` normalise the shared map in place); the fused attention
   ``M = rownorm(clamp(sym(S) - colmean(sym(S)), 0))`` replaces the last block's attention on
   ``ln_1(F_k)``: ``E_k = ln_post(out_proj(M v)) · proj``, no residual, no FFN.
3. Classify (``model.py:147-153, 214-220``): cosine × ``logit_scale`` against
   ``[foreground; background words; mean of the foreground]``, softmax over all rows, keep the
   foreground: ``P [L, C, h, w]``. Sliding windows, if on (``model.py:221-224, 235-276``), average the
   windows' logits, smooth them with the windows' row-normalised attention, softmax, and mix 1 : 1.
4. Fuse (``model.py:226-230``): ``seg = thr(P[select_layer]) · mean_heads(M_{L-1})[1:, 1:] + mean_k P_k``,
   ``thr`` zeroing values below ``attention_threshold ×`` the class's maximum; the threshold is applied
   in place, so the mean sees the thresholded layer too.
5. Label (``main_ovs.py:46-49``, ``miou.py:73-104`` ``cam_to_label``): bilinear to the image's size,
   each class map scaled to peak at its score (its maximum), classes with a score ≤ ``score_threshold``
   dropped, optional min–max normalisation, values below ``bg_threshold`` zeroed, argmax; a pixel with
   nothing left is background.

Classes. The official class file's first line holds the background words, split at spaces and commas,
each a text row of the softmax that never becomes an output map; label 0 is "background". Each other
line is one foreground class, its text used verbatim, label ``c`` for line ``c``. ovdense keeps that
numbering: class 0 must be named ``"background"`` (so that a list like ``["cat", "dog"]`` cannot make
"cat" the background unnoticed); alone, its text row is the word "background" (ADE20K's, Context's,
COCO-Stuff's and Cityscapes' first line); with synonyms, the synonyms are the rows
(``"background, ground, land, ..."`` is VOC's first line ``"ground, land, ..."``). Classes ``1..C`` are
the foreground, each one text: its synonyms joined with ``", "`` (the official line
``"person with clothes, people, human"`` is one text). ``Vocabulary.from_file`` of an official class file
whose first line is "background" gives the official rows, but for stripping each line (context60's
``"wood "``); VOC's and COCO-Object's files need "background, " in front of their first line.

Departures from the official code, each shown against the official output in ``tests/test_cliper.py``:

* a fused-attention row whose clamped values are all 0 (the row equals the column means: a uniform
  attention row) is divided by 0 and is NaN in the official code, which makes the whole map NaN; here
  that row falls back to the symmetrised Sinkhorn row before centring;
* a window whose stride is larger than its crop leaves pixels no window covers (the official stride is
  fixed at 112 px: crops < 112 px give NaN); ovdense refuses such a window, and one whose crop or
  stride is not a multiple of the patch size (the official code has no padding);
* the image is read by ``ovdense.io.load_image`` (EXIF orientation applied, alpha composited over
  white, a palette expanded) and then resized; the official code resizes the opened PIL image before
  converting it to RGB (dropping alpha): the same for RGB and greyscale images, not for palette images
  (Pillow resizes them by nearest neighbour) or transparent ones.

Precision: every step runs in the backbone's dtype, as the official code runs in its model's (fp32 on
the CPU; fp16 on CUDA, where ``clip.load`` keeps OpenAI's fp16 weights); ``scores`` are returned as
float32.

Text: ``ClipBackbone.encode_text`` is the official ``CLIPer.classifier`` (``model.py:176-188``): each
template's embedding normalised, the mean over templates normalised again.

Memory: the ``L - 1`` early attention maps ``[heads, N, N]`` are held at once (``runner.run_blocks``'s
taps), ``N = 1 + h·w``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ovdense.backbone import runner
from ovdense.backbone.clip import ClipBackbone
from ovdense.backbone.dense import attend, qkv
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.errors import OvdenseError
from ovdense.heads.training_free import SegmentationResult, check_resize_and_window, window_boxes
from ovdense.io import ImageInput, load_image

#: the official sliding-window stride in pixels (``forward_slide``'s default, ``model.py:235``)
SLIDE_STRIDE = 112
BACKGROUND = "background"


@dataclass(frozen=True)
class CliperDefaults:
    """The official ViT-B/16 ADE20K settings (``scripts/config/vit-b-16/ovs_ade150.yaml``, its active
    lines): the broadest vocabulary of the official configs and a single background word, so the
    settings for a vocabulary of any size."""

    templates: str = "car"
    short_side: int = 336
    window: tuple[int, int] = (0, 0)  # sliding_crop_size 0
    logit_scale: float = 100.0
    select_layer: int = -1
    attention_threshold: float = 0.2  # attention_thr
    score_threshold: float = 0.3
    bg_threshold: float = 0.3  # bkg_thre
    normalize_maps: bool = False  # is_normalize


DEFAULTS = CliperDefaults()


# --------------------------------------------------------------------------------------------
# Preprocessing


def resized_size(height: int, width: int, size: int, patch: int) -> tuple[int, int]:
    """``(H', W')``: the short side scaled to ``size``, each side rounded half-up to a multiple of
    ``patch`` (``CLIPer._resize``, ``model.py:155-161``)."""
    ratio = size / min(width, height)
    return int(height * ratio / patch + 0.5) * patch, int(width * ratio / patch + 0.5) * patch


def resize(rgb: np.ndarray, size: int, patch: int) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` → ``[H', W', 3]`` by ``resized_size``, PIL bicubic (``model.py:162``)."""
    height, width = resized_size(rgb.shape[0], rgb.shape[1], size, patch)
    if height < patch or width < patch:
        raise OvdenseError(f"the image ({rgb.shape[0]}x{rgb.shape[1]}) resizes to {height}x{width}, smaller "
                           f"than one {patch}-pixel patch; use a larger short_side")
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))


# --------------------------------------------------------------------------------------------
# The encoder: early blocks with taps, then the fused last block for every kept feature


def embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch, class and position embeddings, then ``ln_pre``: ``[B, 1 + h·w, W]``
    (``forward_visual`` and ``upsample_pos_emb``, ``model.py:94-110, 165-174``): the position
    embedding resized bilinearly to the grid and, a reproduced quirk, rounded to fp16
    (``model.py:174``) also when the model runs in fp32."""
    return runner.embed(visual, images, resize="bilinear", pos_dtype=torch.float16)


def sinkhorn_step(attn: torch.Tensor) -> torch.Tensor:
    """Column-normalise, then row-normalise ``[..., N, N]`` (``model.py:59-60``)."""
    attn = attn / attn.sum(dim=-2, keepdim=True)
    return attn / attn.sum(dim=-1, keepdim=True)


def fuse_attention(attn: torch.Tensor) -> torch.Tensor:
    """The fused attention of a Sinkhorn-normalised ``[..., N, N]`` map (``model.py:61-64``):
    symmetrise, subtract each column's mean, clamp at 0, row-normalise.

    Departure: the official row normalisation has no guard, so a row whose entries are all at most
    their columns' means (a uniform row) is 0 / 0 = NaN there; here it is the symmetrised row,
    row-normalised, instead.
    """
    sym = (attn + attn.transpose(-2, -1)) / 2
    fused = (sym - sym.mean(dim=-2, keepdim=True)).clamp(min=0)
    total = fused.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, fused / total, sym / sym.sum(dim=-1, keepdim=True))


def encode(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPer's image encoder (``forward_transformer``, ``model.py:112-138``).

    Args:
        visual: an open_clip ``VisionTransformer`` with ``L ≥ 2`` blocks.
        images: normalised ``[B, 3, H, W]``, ``H`` and ``W`` multiples of the patch size.
    Returns:
        ``E [L, B, N, D]``, the ``L`` features through the fused last block, ``ln_post`` and ``proj``
        (``N = 1 + h·w``, the class token first), and the last fused attention ``M [B, heads, N, N]``.
    """
    blocks = visual.transformer.resblocks
    L = len(blocks)
    x = embed(visual, images)
    taps = [(i, kind) for i in range(L - 1) for kind in ("ln_1", "attn")]
    x, out = runner.run_blocks(visual, x, 0, L - 1, taps=taps)
    feats = [out[(i, "ln_1")] for i in range(L - 1)] + [x]  # L × [B, N, W]; the last one not normed
    attn = out.pop((0, "attn"))  # B, heads, N, N
    for i in range(1, L - 1):
        attn = attn + out.pop((i, "attn"))  # the plain sum (model.py:123)
    last = blocks[-1]
    tokens = []
    for feat in feats:
        attn = sinkhorn_step(attn)  # cumulative: feature k sees k + 1 steps
        fused = fuse_attention(attn)  # B, heads, N, N
        _, _, v = qkv(last, feat)  # B, heads, N, hd (ln_1 of the last block inside)
        tokens.append(attend(last, fused, v))  # B, N, W
    E = visual.ln_post(torch.stack(tokens))  # L, B, N, W
    if visual.proj is not None:
        E = E @ visual.proj  # L, B, N, D
    return E, fused


def patch_logits(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``logit_scale ·`` cosine of ``features [..., D]`` and ``text [T, D]``: ``[..., T]``
    (``CLIPer.classify``, ``model.py:147-153``; the scale is the config's, not CLIP's)."""
    x = features / features.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    return logit_scale * x @ t.to(x.dtype).t()


def slide_logits(visual: nn.Module, images: torch.Tensor, text: torch.Tensor, logit_scale: float,
                 crop: int, stride: int) -> torch.Tensor:
    """The sliding-window logits ``[L, T, h, w]`` of one image ``[1, 3, H, W]`` (``forward_slide``,
    ``model.py:235-276``): each window's logits and head-mean last fused attention (class token
    dropped) placed on the whole grid and averaged; the attention row-normalised and applied
    on the right, ``logits · A``."""
    p = visual.patch_size[0]
    H, W = images.shape[-2:]
    h, w = H // p, W // p
    T = text.shape[0]
    preds = images.new_zeros((len(visual.transformer.resblocks), T, h, w))
    count = images.new_zeros((1, h, w))
    attns = images.new_zeros((h, w, h, w))
    attn_count = torch.zeros_like(attns)
    for y1, y2, x1, x2 in window_boxes(H, W, crop, stride):
        E, fused = encode(visual, images[:, :, y1:y2, x1:x2])
        a, b, c, d = y1 // p, y2 // p, x1 // p, x2 // p
        logits = patch_logits(E[:, 0, 1:], text, logit_scale)  # L, n, T
        preds[..., a:b, c:d] += logits.transpose(-1, -2).reshape(-1, T, b - a, d - c)
        count[..., a:b, c:d] += 1
        attns[a:b, c:d, a:b, c:d] += fused[0].mean(0)[1:, 1:].reshape(b - a, d - c, b - a, d - c)
        attn_count[a:b, c:d, a:b, c:d] += 1
    preds = preds / count
    attns = (attns / (attn_count + 1e-5)).reshape(h * w, h * w)
    attns = attns / attns.sum(dim=-1, keepdim=True)
    return (preds.flatten(-2) @ attns).unflatten(-1, (h, w))


def cliper_maps(visual: nn.Module, images: torch.Tensor, text: torch.Tensor, num_classes: int,
                logit_scale: float, select_layer: int, attention_threshold: float,
                window: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``CLIPer.forward(img, fg, bg)["seg"]`` (``model.py:190-233``): the class maps ``[C, h, w]`` at the
    patch grid of one normalised image ``[1, 3, H, W]``.

    ``text [T, D]`` is ``[foreground (C rows); background words; mean of the foreground]``
    (``model.py:214``); ``window = (crop, stride)`` in pixels, ``(0, 0)`` for none.
    """
    if images.shape[0] != 1:
        raise ValueError(f"CLIPer segments one image at a time, got a batch of {images.shape[0]}")
    p = visual.patch_size[0]
    h, w = images.shape[-2] // p, images.shape[-1] // p
    C, T = num_classes, text.shape[0]
    E, fused = encode(visual, images)
    logits = patch_logits(E[:, 0, 1:], text, logit_scale)  # L, hw, T
    probs = logits.transpose(-1, -2).reshape(-1, T, h, w).softmax(dim=-3)[:, :C]  # L, C, h, w
    crop, stride = window
    if crop > 0:
        slide = slide_logits(visual, images, text, logit_scale, crop, stride).to(probs.dtype)
        probs = slide.softmax(dim=-3)[:, :C] * 0.5 + probs * 0.5
    chosen = probs[select_layer]  # C, h, w: a view (model.py:226)
    chosen[chosen < chosen.amax(dim=(-1, -2), keepdim=True) * attention_threshold] = 0  # so the mean sees it
    smoothed = chosen.flatten(-2) @ fused[0].mean(0)[1:, 1:]  # C, hw: heads' mean, class token dropped
    return smoothed.unflatten(-1, (h, w)) + probs.mean(0)


def maps_to_labels(seg: torch.Tensor, size: tuple[int, int], score_threshold: float, bg_threshold: float,
                   normalize_maps: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Class maps ``[C, h, w]`` → labels ``[H, W]`` (0 background, ``c`` foreground class ``c``) and
    the winning map value ``[H, W]`` at ``size = (H, W)`` (``main_ovs.py:46-49`` with ``cam_to_label``,
    ``miou.py:73-104``; the score of a class is its map's maximum, ``pipeline.py:113-115`` without
    refinement). Computed in ``seg``'s dtype, as the official code does."""
    score = seg.amax(dim=(-1, -2))  # C
    cam = F.interpolate(seg[None], size=size, mode="bilinear", align_corners=False)  # 1, C, H, W
    cam = cam / (cam.amax(dim=(-1, -2), keepdim=True) + 1e-5) * score[:, None, None]
    keep = (score > score_threshold)[None, :, None, None]  # 1, C, 1, 1
    if normalize_maps:
        flat = cam.flatten(-2)  # 1, C, HW
        flat = flat - flat.amin(dim=-1, keepdim=True)
        cam = (flat / (flat.amax(dim=-1, keepdim=True) + 1e-6)).view_as(cam)
    if bg_threshold > 0:
        valid = keep * torch.where(cam < bg_threshold, 0.0, cam)
        scores, labels = valid.max(dim=1)  # 1, H, W
        labels = torch.where(scores == 0, 0, labels + 1)
    else:  # a background map (1 - max)², no official config uses it
        valid = keep * cam
        valid = torch.cat([(1 - valid.amax(dim=1, keepdim=True)) ** 2, valid], dim=1)  # 1, 1 + C, H, W
        labels = valid.argmax(dim=1)  # 1, H, W
        scores = valid.gather(1, labels[:, None])[:, 0]
    return labels[0], scores[0]


# --------------------------------------------------------------------------------------------
# The head


def background_words(words: Sequence[str]) -> list[str]:
    """The background text rows of class 0's words ``("background", *synonyms)``: the synonyms, or
    ``["background"]`` when there are none."""
    return list(words[1:]) or [BACKGROUND]


class CliperSegmenter:
    """Segment images with CLIPer's early-layer fusion (no diffusion refinement; module docstring).

    Every ``None`` argument takes the official ViT-B/16 ADE20K setting (``DEFAULTS``); ``templates``,
    ``short_side`` and ``window`` first take the backbone's own defaults if its config has them.

    Args:
        backbone: the shared CLIP backbone (``L ≥ 2`` blocks).
        classes: class 0, named ``"background"``, gives the background text rows (its synonyms, or the
            word itself), classes ``1..C`` the foreground; a string with commas (or a list) gives a
            class's words, joined into one text for a foreground class.
        templates: ``"car"`` (the official ``car_template.txt``), ``"imagenet80"`` (the official
            ``openai_template.txt``), another ovdense set or a list of templates with ``{}``.
        short_side: resize the short side to this (``size``); ``0`` keeps it; both sides are then
            rounded to patch multiples.
        window: ``(crop, stride)`` in pixels, multiples of the patch size, stride ≤ crop; ``(0, 0)``: one
            pass (``sliding_crop_size``; the official stride is always ``SLIDE_STRIDE`` = 112).
        logit_scale: the softmax's scale (``logit_scale``, 50 to 100 in the official configs).
        select_layer: which of the ``L`` features is smoothed by the fused attention (``select_layer``).
        attention_threshold: its values below this fraction of each class's maximum are zeroed first
            (``attention_thr``).
        score_threshold: classes whose map maximum is at most this are dropped (``score_threshold``).
        bg_threshold: map values below this are zeroed; pixels with nothing left are class 0
            (``bkg_thre``); 0 chooses the official ``(1 - max)²`` background map instead.
        normalize_maps: min–max normalise each class map before ``bg_threshold`` (``is_normalize``).
    """

    method = "cliper"
    #: class 0 must be "background" (the mm segmentor adds it for a dataset without one)
    background_first = True

    def __init__(
        self,
        backbone: ClipBackbone,
        classes: Sequence[ClassSpec] | Vocabulary = (),
        templates: Templates | None = None,
        short_side: int | None = None,
        window: tuple[int, int] | None = None,
        logit_scale: float | None = None,
        select_layer: int | None = None,
        attention_threshold: float | None = None,
        score_threshold: float | None = None,
        bg_threshold: float | None = None,
        normalize_maps: bool | None = None,
    ):
        self.backbone = backbone
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        own = backbone.defaults  # the model's own defaults come before the method's
        self.templates = templates if templates is not None else own.get("templates", DEFAULTS.templates)
        self.short_side = int(_pick(short_side, own.get("short_side", DEFAULTS.short_side)))
        self.window = tuple(int(v) for v in _pick(window, own.get("window", DEFAULTS.window)))
        self.logit_scale = float(_pick(logit_scale, DEFAULTS.logit_scale))
        self.select_layer = _pick(select_layer, DEFAULTS.select_layer)
        self.attention_threshold = float(_pick(attention_threshold, DEFAULTS.attention_threshold))
        self.score_threshold = float(_pick(score_threshold, DEFAULTS.score_threshold))
        self.bg_threshold = float(_pick(bg_threshold, DEFAULTS.bg_threshold))
        self.normalize_maps = bool(_pick(normalize_maps, DEFAULTS.normalize_maps))
        self._validate()
        words = self.vocabulary.synonyms()
        self.background_words = background_words(words[0])
        self.foreground_names = [", ".join(group) for group in words[1:]]
        fg = backbone.encode_text(self.foreground_names, self.templates)  # C, D ("car": CAR_TEMPLATES)
        bg = backbone.encode_text(self.background_words, self.templates)  # B, D
        self.text = torch.cat([fg, bg, fg.mean(dim=0, keepdim=True)])  # C + B + 1, D (model.py:214)

    def _validate(self) -> None:
        L, p = self.backbone.num_layers, self.backbone.patch_size
        if L < 2:
            raise OvdenseError(f"CLIPer fuses the attention of the blocks before the last; this model has "
                               f"{L} block")
        if self.vocabulary.names[0] != BACKGROUND:
            raise OvdenseError(f"CLIPer's class 0 is the background: name it 'background' (its synonyms, if "
                               f"any, are the background words: 'background, ground, sky'); got "
                               f"{self.vocabulary.names[0]!r}")
        if len(self.vocabulary) < 2:
            raise OvdenseError("CLIPer needs the background class 0 and at least one class after it, e.g. "
                               "['background', 'cat']")
        check_resize_and_window(self.short_side, self.window, multiple=p)  # the official stride: 112
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise OvdenseError(f"logit_scale must be positive, got {self.logit_scale}")
        if isinstance(self.select_layer, bool) or not isinstance(self.select_layer, (int, np.integer)) \
                or not -L <= self.select_layer < L:
            raise OvdenseError(f"select_layer must be an integer in [{-L}, {L - 1}] (this model has {L} "
                               f"blocks), got {self.select_layer!r}")
        self.select_layer = int(self.select_layer)
        for name in ("attention_threshold", "score_threshold", "bg_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OvdenseError(f"{name} must lie in [0, 1], got {value}")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.vocabulary.names

    def settings(self) -> dict:
        """Every setting that shapes the output (written into the CLI's JSON)."""
        return {
            "method": "cliper",
            "templates": self.templates if isinstance(self.templates, str) else list(self.templates),
            "short_side": self.short_side,
            "window": list(self.window),
            "logit_scale": self.logit_scale,
            "select_layer": self.select_layer,
            "attention_threshold": self.attention_threshold,
            "score_threshold": self.score_threshold,
            "bg_threshold": self.bg_threshold,
            "normalize_maps": self.normalize_maps,
            "background_words": list(self.background_words),
            "refinement": None,
        }

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize (``resize``) and normalise: ``[1, 3, H', W']`` on the backbone's device."""
        size = self.short_side or min(rgb.shape[:2])
        return self.backbone.to_tensor(resize(rgb, size, self.backbone.patch_size))

    @torch.inference_mode()
    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The class maps ``[C, H'/p, W'/p]`` of a prepared image ``x [1, 3, H', W']`` (``cliper_maps``),
        the foreground classes ``1..C`` in order."""
        p = self.backbone.patch_size
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[-2] % p or x.shape[-1] % p:
            raise OvdenseError(f"maps takes one prepared image [1, 3, H, W] with H and W multiples of {p}, "
                               f"got {tuple(x.shape)}")
        return cliper_maps(self.backbone.model.visual, x, self.text, len(self.vocabulary) - 1,
                           self.logit_scale, self.select_layer, self.attention_threshold, self.window)

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> SegmentationResult:
        """Segment one image (path, PIL image or RGB array) at its own resolution; ``scores`` holds the
        winning map's value (``maps_to_labels``: 0 at background pixels when ``bg_threshold > 0``)."""
        rgb = load_image(image)
        seg = self.maps(self.prepare(rgb))
        labels, scores = maps_to_labels(seg, rgb.shape[:2], self.score_threshold, self.bg_threshold,
                                        self.normalize_maps)
        return SegmentationResult(labels.cpu().numpy(), scores.float().cpu().numpy(), self.classes,
                                  tuple(self.vocabulary.synonyms()), self.settings())


def _pick(value, default):
    return default if value is None else value
