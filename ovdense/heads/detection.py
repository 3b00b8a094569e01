"""Open-vocabulary detection on the frozen shared backbone: the plain-torch parts of F-VLM / F-ViT.

F-VLM (Kuo et al., "F-VLM: Open-Vocabulary Object Detection upon Frozen Vision and Language
Models", ICLR 2023) keeps CLIP frozen, trains a detector head on base classes whose classifier is
the text embeddings, and at test time ensembles the head's scores with CLIP's own region scores.
F-ViT (Wu et al., "CLIPSelf", ICLR 2024) is its ViT form. Followed here, file by file:

* wusize/CLIPSelf ``F-ViT/models/evaclip_vit.py`` and wusize/CLIM ``ovdet/ovdet/models/backbones/
  clip_vit.py`` (the mmdet 3.x port on OpenAI ViT-B/16): one frozen pass gives the tokens after
  blocks ``out_indices = (3, 5, 7, 11)`` (B/16; ``(6, 10, 14, 23)`` for L/14), the last block run
  as the value path (``forward_without_attn``: MaskCLIP's block with residual and FFN, here
  ``dense.maskclip_block``); the position embedding reaches the grid by bicubic resizing to the
  exact size (their patched ``rescale_positional_embedding``, ``runner.embed(resize="size")``);
  a simple pyramid — two stride-2 transposed convs with norm + GELU between them (stride p/4),
  one (p/2), identity (p), 2×2 max-pool (2p) — feeds mmdet's FPN (``SimplePyramid``); the
  last block's tokens through ``ln_post`` and ``proj``, L2-normalised, are the dense CLIP map.
* F-ViT ``models/fvit_head.py`` ``FViTBBoxHead`` / CLIM ``fvlm_bbox_heads/convfc_bbox_head.py``:
  the classifier ``τ · normalize(region) · [text; background]ᵀ`` with a learned background
  embedding (initialised from the text embedding of "background", as F-ViT) and a learned
  temperature τ starting at 50 (``OpenVocabClassifier``); novel classes are masked to −∞ in
  training by F-ViT's ``CustomCrossEntropyLoss`` (class weight 0), or — ovdense's default —
  simply absent from the training vocabulary.
* At test time (``FViTRoIHead._bbox_forward`` + ``FViTBBoxHead.forward``): each box's CLIP
  embedding is a 1×1 RoIAlign on the dense CLIP map (``sampling_ratio=0``, ``aligned=True``:
  mmcv's ``RoIAlign(use_torchvision=True)``; ``region_clip_embeddings``), its VLM probabilities
  ``softmax(T_vlm · cos)`` over the same ``[text; background]`` columns (T_vlm = 75 in the
  OV-COCO B/16 configs, 50 in OV-LVIS B/16; ``vlm_probabilities``), and the geometric ensemble
  ``det^(1−α) · vlm^α`` on seen columns, ``det^(1−β) · vlm^β`` on the others, where the
  background column counts as seen and nothing is renormalised (``ensemble``); mmdet's
  ``multiclass_nms`` then drops the background column.

Departures, each deliberate:

* Norm layers. F-ViT puts ``SyncBN`` in the pyramid (and the FPN and box head): it needs several
  processes and does not run on one CPU. ``SimplePyramid`` takes ``norm="group"`` (GroupNorm,
  32 groups, the single-device choice of detectron2's ViTDet) by default; ``"batch"``,
  ``"sync_batch"`` (F-ViT's, for multi-GPU runs) and ``"none"`` are available.
* The region embedding is a linear layer to the joint space ``D`` after the box head's FCs
  (CLIM's ``fc_cls`` rebuilt with ``out_features = D``); F-ViT uses the ReLU'd output of its
  last cls FC, whose width happens to equal ``D``.
* ``out_indices`` for other depths: ``fvit_out_indices`` scales B/16's taps by ``L/12`` (floor)
  and keeps the last block — the rule reproduces F-ViT's L/14 choice ``(6, 10, 14, 23)``; the
  6-block toy gets ``(1, 2, 3, 5)``.

The frozen backbone is always passed in, run in eval mode under ``no_grad``, and never stored
as a submodule: it never enters a head's ``state_dict`` or an optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone import dense
from ovdense.backbone.runner import embed, run_blocks
from ovdense.errors import OvdenseError

#: F-ViT's taps for the 12-block B/16 (0-indexed); see ``fvit_out_indices``.
FVIT_B16_INDICES = (3, 5, 7, 11)
#: F-ViT / CLIM ensemble weights: OV-COCO (B/16 and L/14) and OV-LVIS B/16.
OV_COCO = dict(alpha=0.1, beta=0.8, vlm_temperature=75.0)
OV_LVIS_B16 = dict(alpha=0.1, beta=0.6, vlm_temperature=50.0)
HEAD_FORMAT = "ovdense-fvit-head/1"


def fvit_out_indices(num_layers: int) -> tuple[int, int, int, int]:
    """The four blocks (0-indexed) whose tokens feed the pyramid, for a tower of ``num_layers``.

    B/16's ``(3, 5, 7, 11)`` scaled by ``L / 12`` (floor) for the first three, the last block
    always last: L = 12 → (3, 5, 7, 11); L = 24 → (6, 10, 14, 23), F-ViT's L/14 config;
    L = 6 (the toy) → (1, 2, 3, 5). Very shallow towers may repeat a tap (two levels then share
    tokens).
    """
    if num_layers < 2:
        raise OvdenseError(f"F-ViT needs a tower of at least 2 blocks, this one has {num_layers}")
    first = tuple(min(i * num_layers // 12, num_layers - 2) for i in FVIT_B16_INDICES[:3])
    return (*first, num_layers - 1)


# --------------------------------------------------------------------------------------------
# The frozen pass


@dataclass
class FrozenFeatures:
    """What one frozen backbone pass gives the detector.

    Attributes:
        levels: four token maps ``[B, W, h, w]`` (float32, no grad), after the blocks of
            ``indices``; the last block's map is its value-path output.
        clip_map: the dense CLIP map ``[B, D, h, w]``, L2-normalised along ``D``, or ``None``.
        stride: the patch size ``p`` (pixels per cell of ``h × w``).
    """

    levels: list[torch.Tensor]
    clip_map: torch.Tensor | None
    stride: int


@torch.no_grad()
def frozen_features(
    backbone,
    images: torch.Tensor,
    indices: Sequence[int] | None = None,
    method: str = "maskclip",
    with_clip_map: bool = True,
    **options,
) -> FrozenFeatures:
    """One pass of the frozen tower: pyramid taps and the dense CLIP map (F-ViT's backbone forward).

    Args:
        backbone: a ``ClipBackbone``; its tower stays in eval mode and receives no gradient.
        images: normalised ``[B, 3, H, W]``, ``H`` and ``W`` multiples of the patch size.
        indices: four block indices; default ``fvit_out_indices(L)``. An index equal to the last
            block takes the value-path (MaskCLIP) output, as F-ViT's ``forward_without_attn``.
        method: the training-free last block that makes the dense CLIP map (``dense.METHODS``;
            F-ViT's is ``maskclip``, shared with the pyramid's last level, so no extra block runs).
        with_clip_map: skip the map (training needs only the levels).
        options: the method's options (its function in ``ovdense.backbone.dense``).
    """
    if method not in dense.METHODS:
        raise OvdenseError(f"unknown method {method!r}; choose from: {', '.join(dense.METHODS)}")
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    L = len(blocks)
    indices = tuple(int(i) for i in (fvit_out_indices(L) if indices is None else indices))
    if len(indices) != 4 or min(indices) < 0 or max(indices) >= L:
        raise OvdenseError(f"indices must be four blocks in [0, {L - 1}], got {list(indices)}")
    spec = dense.METHODS[method]
    if with_clip_map and any(i >= L - 1 for i in spec.capture):
        raise OvdenseError(f"{method} reads blocks {list(spec.capture)}, this tower has only {L}")
    was_training = visual.training
    visual.eval()
    try:
        p = int(visual.patch_size[0])
        h, w = images.shape[-2] // p, images.shape[-1] // p
        x0 = embed(visual, images, resize="size")  # B, 1+hw, W
        capture = spec.capture if with_clip_map else ()
        taps = {i for i in indices if i < L - 1} | {c - 1 for c in capture if c > 0}
        x, tapped = run_blocks(visual, x0, 0, L - 1, taps=sorted(taps))  # B, 1+hw, W: input of the last block
        value = dense.maskclip_block(blocks[-1], x, (h, w))  # B, 1+hw, W (forward_without_attn)
        tapped[L - 1] = value

        def grid(tokens: torch.Tensor) -> torch.Tensor:
            B, N, W = tokens.shape
            return tokens[:, 1:].float().reshape(B, h, w, W).permute(0, 3, 1, 2).contiguous()  # B, W, h, w

        levels = [grid(tapped[i]) for i in indices]
        clip_map = None
        if with_clip_map:
            if method == "maskclip" and not options:
                last = value
            else:
                if capture:
                    maps = [dense.self_self_map(blocks[c], tapped[c - 1] if c > 0 else x0) for c in capture]
                    options = {**options, "intermediate_maps": maps}
                last = spec.block(blocks[-1], x, (h, w), **options)  # B, 1+hw, W
            tokens = visual.ln_post(last) @ visual.proj  # B, 1+hw, D
            clip_map = F.normalize(grid(tokens), dim=1)  # B, D, h, w
    finally:
        visual.train(was_training)
    return FrozenFeatures(levels=levels, clip_map=clip_map, stride=p)


# --------------------------------------------------------------------------------------------
# The trained parts


def make_norm(norm: str, channels: int, num_groups: int = 32) -> nn.Module:
    """``"group"`` (GroupNorm), ``"batch"``, ``"sync_batch"`` (F-ViT's SyncBN) or ``"none"``."""
    if norm == "group":
        if channels % num_groups:
            raise OvdenseError(f"GroupNorm: {channels} channels do not split into {num_groups} groups; "
                               "pick num_groups dividing the width")
        return nn.GroupNorm(num_groups, channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if norm == "none":
        return nn.Identity()
    raise OvdenseError(f"norm must be group, batch, sync_batch or none, not {norm!r}")


class SimplePyramid(nn.Module):
    """F-ViT's ``interpolate1..4``: four same-width token maps → strides ``p/4, p/2, p, 2p``.

    ``[B, W, h, w]`` each in; out ``[B, W, 4h, 4w]``, ``[B, W, 2h, 2w]``, ``[B, W, h, w]``,
    ``[B, W, h/2, w/2]`` (B/16: strides 4, 8, 16, 32, the FPN's usual inputs).
    """

    def __init__(self, width: int, norm: str = "group", num_groups: int = 32):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            make_norm(norm, width, num_groups),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    @staticmethod
    def strides(patch_size: int) -> tuple[int, int, int, int]:
        """Output strides in pixels for a patch size ``p``: ``(p/4, p/2, p, 2p)``."""
        if patch_size % 4:
            raise OvdenseError(f"the simple pyramid needs a patch size divisible by 4, got {patch_size}")
        return (patch_size // 4, patch_size // 2, patch_size, 2 * patch_size)

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(levels) != 4:
            raise ValueError(f"the pyramid takes 4 maps, got {len(levels)}")
        return tuple(layer(x) for layer, x in zip((self.up4, self.up2, self.same, self.down2), levels))


class OpenVocabClassifier(nn.Module):
    """F-ViT's classifier: ``τ · normalize(r) · [t_1 … t_C, normalize(b)]ᵀ`` → logits ``[R, C+1]``.

    ``r`` are region embeddings ``[R, D]`` (the box head's output in the joint space), ``t`` the
    L2-normalised text embeddings ``[C, D]`` of whatever vocabulary is given (nothing here
    depends on ``C``), ``b`` the learned background embedding, ``τ`` the learned temperature
    (``detect_temperature`` in F-ViT, starting at 50). The last column is the background.
    """

    def __init__(self, embed_dim: int, temperature: float = 50.0, learn_temperature: bool = True,
                 background: torch.Tensor | None = None):
        super().__init__()
        init = torch.tensor(float(temperature))
        if learn_temperature:
            self.temperature = nn.Parameter(init)
        else:
            self.register_buffer("temperature", init)
        if background is None:
            background = torch.randn(embed_dim) / embed_dim**0.5
        if tuple(background.shape) != (embed_dim,):
            raise ValueError(f"background must be [{embed_dim}], got {tuple(background.shape)}")
        self.background = nn.Parameter(F.normalize(background.detach().float().clone(), dim=0))

    def columns(self, text: torch.Tensor) -> torch.Tensor:
        """``[C+1, D]``: the text embeddings and the normalised background embedding."""
        if text.dim() != 2 or text.shape[0] == 0:
            raise OvdenseError("the vocabulary is empty: give at least one class name")
        background = F.normalize(self.background, dim=0).to(text.dtype)
        return torch.cat([text, background[None]], dim=0)  # C+1, D

    def forward(self, regions: torch.Tensor, text: torch.Tensor, trainable: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Logits ``[R, C+1]``. ``trainable`` (``[C]`` bool) masks the other classes to ``−∞``
        (F-ViT's ``CustomCrossEntropyLoss`` with class weight 0): they get no probability and no
        gradient."""
        logits = self.temperature * F.normalize(regions, dim=-1) @ self.columns(text).T  # R, C+1
        if trainable is not None:
            keep = torch.cat([trainable.to(torch.bool), trainable.new_ones(1, dtype=torch.bool)])  # C+1
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits


# --------------------------------------------------------------------------------------------
# Test time: CLIP's region scores and the ensemble


def region_clip_embeddings(clip_map: torch.Tensor, rois: torch.Tensor, stride: int) -> torch.Tensor:
    """Each box's CLIP embedding ``[R, D]``, L2-normalised: a 1×1 RoIAlign on the dense map.

    Args:
        clip_map: ``[B, D, h, w]`` (``FrozenFeatures.clip_map``).
        rois: ``[R, 5]`` rows ``(batch index, x1, y1, x2, y2)`` in pixels of the network input.
        stride: pixels per map cell (the patch size).
    As F-ViT's ``vlm_roi_extractor`` (mmcv ``RoIAlign(output_size=1, sampling_ratio=0,
    use_torchvision=True)``, ``aligned=True``, spatial scale ``1/stride``), with torchvision's op,
    so inference needs no mmcv.
    """
    from torchvision.ops import roi_align

    if rois.numel() == 0:
        return clip_map.new_zeros(0, clip_map.shape[1])
    pooled = roi_align(clip_map, rois.to(clip_map.dtype), output_size=1, spatial_scale=1.0 / stride,
                       sampling_ratio=0, aligned=True)  # R, D, 1, 1
    return F.normalize(pooled[:, :, 0, 0], dim=-1)  # R, D


def vlm_probabilities(region_clip: torch.Tensor, columns: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(T · region_clip · columnsᵀ)`` ``[R, C+1]`` over the classifier's columns
    (text and background, ``OpenVocabClassifier.columns``), as F-ViT's ``vlm_score``."""
    return torch.softmax(temperature * region_clip @ columns.T, dim=-1)


def ensemble(det: torch.Tensor, vlm: torch.Tensor, seen: torch.Tensor, alpha: float, beta: float
             ) -> torch.Tensor:
    """F-ViT's geometric ensemble of probabilities ``[R, C+1]`` (last column background).

    ``p = det^(1−α) · vlm^α`` on seen columns (``seen [C]`` True) and on the background column,
    ``det^(1−β) · vlm^β`` on the others. Not renormalised (the background column is then dropped
    by mmdet's ``multiclass_nms``), exactly as ``FViTBBoxHead.forward``.
    """
    if det.shape != vlm.shape or det.shape[-1] != seen.shape[0] + 1:
        raise ValueError(f"det {tuple(det.shape)}, vlm {tuple(vlm.shape)} and seen {tuple(seen.shape)} "
                         "must agree on C+1 columns")
    seen_all = torch.cat([seen.to(torch.bool), seen.new_ones(1, dtype=torch.bool)])  # C+1
    exponent = torch.where(seen_all, det.new_tensor(alpha), det.new_tensor(beta))  # C+1
    return det.pow(1.0 - exponent) * vlm.pow(exponent)


def check_vocabulary(classes: Sequence[str]) -> list[str]:
    """A clean class list: non-empty, strings, no duplicates; else one ``OvdenseError``."""
    if isinstance(classes, str):
        classes = [classes]
    names = [c.strip() if isinstance(c, str) else c for c in classes]
    if not names:
        raise OvdenseError("the class list is empty: give at least one class name")
    bad = [c for c in names if not isinstance(c, str) or not c]
    if bad:
        raise OvdenseError(f"class names must be non-empty strings, got {bad[0]!r}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise OvdenseError(f"class {name!r} is listed twice; give each class once")
        seen.add(name)
    return names


def seen_mask(classes: Sequence[str], training_classes: Sequence[str]) -> torch.Tensor:
    """``[C]`` bool: which classes of a vocabulary were in the training vocabulary (they get α;
    the others, never trained on, get β)."""
    known = set(training_classes)
    return torch.tensor([c in known for c in classes], dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Head checkpoints: safetensors, tied to the backbone they were trained on


def backbone_key(backbone) -> str:
    """Identifies a backbone's image tower across installs: the model name and a SHA-256 of the
    tensors every head depends on first and last (``conv1``, position embedding, the last
    block's ``ln_1``, ``ln_post``, ``proj``), independent of file paths."""
    visual = backbone.model.visual
    digest = hashlib.sha256()
    last = visual.transformer.resblocks[-1]
    for tensor in (visual.conv1.weight, visual.positional_embedding, last.ln_1.weight, visual.ln_post.weight,
                   visual.proj):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{backbone.name}:{digest.hexdigest()[:16]}"


def save_head(path: str | os.PathLike, state: dict[str, torch.Tensor], backbone, config: dict) -> Path:
    """Write a head's ``state`` (the detector's trained tensors, no backbone) as safetensors with
    ``{"format", "backbone", "config"}`` metadata, atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": HEAD_FORMAT, "backbone": backbone_key(backbone), "config": json.dumps(config)}
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def load_head(path: str | os.PathLike, backbone) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a head checkpoint written by ``save_head``: ``(state, config)``.

    Raises ``OvdenseError`` for a missing file, a file that is not safetensors (a pickle is never
    unpickled), a file without ovdense's F-ViT metadata, and a head trained on another backbone.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"head checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a pickle or any unreadable file is the user's wrong file
        raise OvdenseError(
            f"{path} is not a safetensors head checkpoint ({type(e).__name__}); ovdense never unpickles "
            "files: give a head written by ovdense (tools/train.py, save_head)"
        ) from e
    if metadata.get("format") != HEAD_FORMAT:
        raise OvdenseError(f"{path} is not an ovdense F-ViT head (format {metadata.get('format')!r}, "
                           f"expected {HEAD_FORMAT!r})")
    expected = backbone_key(backbone)
    if metadata.get("backbone") != expected:
        raise OvdenseError(f"{path} was trained on backbone {metadata.get('backbone')!r}, not this one "
                           f"({expected}); load the backbone it was trained on or retrain the head")
    return state, json.loads(metadata.get("config", "{}"))


# --------------------------------------------------------------------------------------------
# The Python API

#: The toy backbone's trained head, shipped in ``ovdense/assets`` (trained by
#: ``configs/ovdet/fvlm_toy_synthetic.py`` on the toy world's base classes).
TOY_HEAD_FILE = "fvit-toy-head.safetensors"


def default_head_checkpoint(backbone) -> Path | None:
    """The F-ViT head that ships with ovdense for ``backbone``: ``ovdense/assets/fvit-toy-head.safetensors``
    for the toy CLIP when the file is installed; ``None`` otherwise (no other backbone ships one)."""
    from ovdense.backbone.clip import TOY_NAME

    if backbone.name == TOY_NAME:
        path = Path(__file__).resolve().parent.parent / "assets" / TOY_HEAD_FILE
        if path.is_file():
            return path
    return None


@dataclass
class DetectionResult:
    """One image's detections, in pixels of the input image.

    Attributes:
        boxes: ``[K, 4]`` float ``(x1, y1, x2, y2)``.
        scores: ``[K]``, the ensemble's (or the detector's) probability.
        class_ids: ``[K]`` indices into ``classes``.
        masks: ``[K, H, W]`` bool, or ``None`` for a box-only (Faster R-CNN) head.
        classes: the vocabulary.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    masks: np.ndarray | None
    classes: list[str]


class Detector:
    """Detect and segment any words with a trained F-ViT head on the shared backbone.

    Args:
        backbone: the ``ClipBackbone`` the head was trained on (checked against the head file).
        classes: any class names; those outside the head's training vocabulary get β.
        head_checkpoint: a head written by ``ovdense.mm.detection.export_head`` /
            ``ExportFViTHeadHook``; ``None``: ``default_head_checkpoint(backbone)`` (the toy's).
        score_threshold: drop detections below this score.
        image_size: the long side images are resized to (default: the backbone's ``short_side``
            default for the toy, else 640, F-ViT's OV-COCO size).
        ensemble: F-ViT's CLIP ensemble on (``False``: the detector's own scores).

    (Transitional: runs through mmdet 3.3, imported lazily; the plain-torch path replaces it.)
    """

    def __init__(self, backbone, classes: Sequence[str], head_checkpoint: str | os.PathLike | None = None,
                 score_threshold: float = 0.3, image_size: int | None = None, ensemble: bool = True):
        if head_checkpoint is None:
            head_checkpoint = default_head_checkpoint(backbone)
            if head_checkpoint is None:
                raise OvdenseError(
                    f"no F-ViT head ships for backbone {backbone.name!r}: train one with "
                    "python tools/train.py configs/ovdet/fvlm_toy_synthetic.py (or another configs/ovdet "
                    "config) and pass its work_dirs/…/fvit_head.safetensors as head_checkpoint "
                    "(CLI --head-checkpoint)"
                )
        if not 0.0 <= score_threshold <= 1.0:
            raise OvdenseError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        from mmengine.config import ConfigDict
        from mmengine.registry import init_default_scope

        from ovdense.mm.detection import OvdenseFViT

        classes = check_vocabulary(classes)
        state, config = load_head(head_checkpoint, backbone)
        init_default_scope("mmdet")
        self.backbone = backbone
        self.model = OvdenseFViT(clip=backbone, test_classes=list(classes), **ConfigDict(config))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise OvdenseError(f"{head_checkpoint} does not fit its own configuration: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
        self.model.to(backbone.device).eval()
        self.model.roi_head.bbox_head.ensemble = ensemble
        self.classes = list(self.model.test_classes)
        self.score_threshold = float(score_threshold)
        self.image_size = image_size or int(backbone.defaults.get("short_side", 640))

    @torch.no_grad()
    def predict(self, image) -> DetectionResult:
        """Detect in one image (a path, PIL image or RGB ``uint8`` array)."""
        import cv2
        from mmdet.structures import DetDataSample

        from ovdense.io import load_image

        rgb = load_image(image)
        H, W = rgb.shape[:2]
        factor = self.image_size / max(H, W)
        h, w = max(1, int(H * factor + 0.5)), max(1, int(W * factor + 0.5))
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        bgr = torch.from_numpy(np.ascontiguousarray(resized[:, :, ::-1])).permute(2, 0, 1)  # 3, h, w
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(H, W), scale_factor=(w / W, h / H)))
        data = self.model.data_preprocessor(dict(inputs=[bgr], data_samples=[sample]), training=False)
        pred = self.model.predict(data["inputs"], data["data_samples"], rescale=True)[0].pred_instances
        keep = pred.scores >= self.score_threshold
        masks = pred.masks[keep].cpu().numpy().astype(bool) if "masks" in pred else None
        return DetectionResult(boxes=pred.bboxes[keep].cpu().numpy(), scores=pred.scores[keep].cpu().numpy(),
                               class_ids=pred.labels[keep].cpu().numpy(), masks=masks, classes=self.classes)
