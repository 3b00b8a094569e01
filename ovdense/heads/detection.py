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
  32 groups: no statistics shared across processes; detectron2's ViTDet pyramid uses LayerNorm) by
  default; ``"batch"``, ``"sync_batch"`` (F-ViT's, for multi-GPU runs) and ``"none"`` are available.
* The region embedding is a linear layer to the joint space ``D`` after the box head's FCs
  (CLIM's ``fc_cls`` rebuilt with ``out_features = D``); F-ViT uses the ReLU'd output of its
  last cls FC, whose width happens to equal ``D``.
* ``out_indices`` for other depths: ``fvit_out_indices`` scales B/16's taps by ``L/12`` (floor)
  and keeps the last block — the rule reproduces F-ViT's L/14 choice ``(6, 10, 14, 23)``; the
  6-block toy gets ``(1, 2, 3, 5)``.

The frozen backbone is always passed in, run in eval mode under ``no_grad``, and never stored
as a submodule: it never enters a head's ``state_dict`` or an optimizer.

Inference needs no OpenMMLab package: ``PlainFViT`` rebuilds, from the head file that
``ovdense.mm.detection.export_head`` writes (state dict + config), exactly what mmdet 3.3's
``TwoStageDetector.predict`` runs for ``OvdenseFViT`` — mmdet's ``FPN``, ``RPNHead`` (anchors, delta
decoding, per-level NMS), ``SingleRoIExtractor`` (torchvision's ``roi_align``, equal to mmcv's
``RoIAlign(aligned=True)``), ``ConvFCBBoxHead`` with the open-vocabulary classifier and ensemble,
``multiclass_nms`` (mmcv's ``batched_nms`` offsets over torchvision's ``nms``), ``FCNMaskHead`` and
its mask pasting — each class names the mmdet/mmcv file it follows. On the same head and image it
gives mmdet's boxes, scores, labels and masks (``tests/test_detector_plain.py``; equal to float32
rounding on CPU). ``Detector`` is the user API on top. Departures: masks are always pasted box by
box (mmdet's CPU branch; on a GPU mmdet pastes in chunks over the whole image); options the
shipped configs do not use and that are not reproduced here (mmcv ``nms`` ``offset=1``, soft-NMS,
class-specific mask heads, ``with_avg_pool`` box heads, shared RoI heads, non-ReLU activations)
are refused with an ``OvdenseError`` instead of approximated.
"""

from __future__ import annotations

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


def read_classes(classes) -> list[str]:
    """A class list, or a class file (one name per line; a ``background`` line is skipped)."""
    if isinstance(classes, (str, os.PathLike)) and Path(classes).suffix == ".txt":
        path = Path(classes)
        if not path.is_file():
            raise OvdenseError(f"class file not found: {path}")
        classes = [line.strip() for line in path.read_text().splitlines()]
        classes = [c for c in classes if c and c != "background"]
    return check_vocabulary(classes)


def seen_mask(classes: Sequence[str], training_classes: Sequence[str]) -> torch.Tensor:
    """``[C]`` bool: which classes of a vocabulary were in the training vocabulary (they get α;
    the others, never trained on, get β)."""
    known = set(training_classes)
    return torch.tensor([c in known for c in classes], dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Head checkpoints: safetensors, tied to the backbone they were trained on


def save_head(path: str | os.PathLike, state: dict[str, torch.Tensor], backbone, config: dict,
              dtype: torch.dtype | None = None) -> Path:
    """Write a head's ``state`` (the detector's trained tensors, no backbone) as safetensors with
    ``{"format", "backbone", "config"}`` metadata, atomically (temporary name, then rename).
    ``dtype`` (e.g. ``torch.float16``: half the file, as the SAN head ships) stores the floating
    tensors in that type; ``load_head`` gives them back as float32."""
    from safetensors.torch import save

    from ovdense.io import write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": HEAD_FORMAT, "backbone": backbone.identity, "config": json.dumps(config)}
    return write_bytes(path, save(tensors, metadata=metadata))


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
    expected = backbone.identity
    if metadata.get("backbone") != expected:
        raise OvdenseError(f"{path} was trained on backbone {metadata.get('backbone')!r}, not this one "
                           f"({expected}); load the backbone it was trained on or retrain the head")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 files: float32
    return state, json.loads(metadata.get("config", "{}"))


# --------------------------------------------------------------------------------------------
# Plain-torch inference: mmdet 3.3's two-stage test path, module by module
#
# Each piece follows one mmdet 3.3.0 / mmcv 2.x file (named in its docstring) at the options the
# configs use, with the same parameter names, so a head file written by
# ``ovdense.mm.detection.export_head`` loads strictly; options the plain path does not reproduce are
# refused with an OvdenseError rather than approximated. Only torch and torchvision.ops.

#: config keys that matter only to training (losses, samplers, init); ignored at inference.
_TRAIN_ONLY = {"loss_cls", "loss_bbox", "loss_mask", "init_cfg", "train_cfg", "reg_decoded_bbox",
               "predict_box_type", "type", "requires_grad"}


def _unsupported(what: str) -> OvdenseError:
    return OvdenseError(f"the plain-torch detector does not reproduce {what}; run this head through mmdet "
                        "(python tools/test.py CONFIG) or train one with the options of configs/ovdet/")


def _check_keys(where: str, cfg: dict, known: set[str]) -> None:
    extra = sorted(set(cfg) - known - _TRAIN_ONLY)
    if extra:
        raise _unsupported(f"{where} option(s) {extra}")


def _relu(act_cfg) -> bool:
    """mmcv activation configs: ``None`` (none) or ``ReLU`` (the only one the configs use)."""
    if act_cfg is None:
        return False
    if dict(act_cfg).get("type") == "ReLU":
        return True
    raise _unsupported(f"activation {act_cfg!r}")


class ConvModule(nn.Module):
    """mmcv ``cnn/bricks/conv_module.py`` ``ConvModule`` at its default ``order=('conv', 'norm', 'act')``:
    conv (bias only without a norm, ``bias='auto'``) → norm → ReLU. The norm is registered under
    mmcv's abbreviation (``gn``, ``bn``: ``build_norm_layer``) so state-dict keys are mmdet's.
    BatchNorm and SyncBN are both ``BatchNorm2d`` here (identical in eval mode)."""

    _NORMS = {"GN": "gn", "BN": "bn", "BN2d": "bn", "SyncBN": "bn"}

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, conv_cfg=None, norm_cfg=None, act_cfg=None):
        super().__init__()
        if conv_cfg is not None and dict(conv_cfg).get("type") not in ("Conv", "Conv2d"):
            raise _unsupported(f"conv {conv_cfg!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              bias=norm_cfg is None)
        self.norm_name = None
        if norm_cfg is not None:
            norm_cfg = dict(norm_cfg)
            kind = norm_cfg.get("type")
            if kind not in self._NORMS:
                raise _unsupported(f"norm {kind!r}")
            eps = float(norm_cfg.get("eps", 1e-5))
            norm = (nn.GroupNorm(int(norm_cfg["num_groups"]), out_channels, eps=eps) if kind == "GN"
                    else nn.BatchNorm2d(out_channels, eps=eps))
            self.norm_name = self._NORMS[kind]
            self.add_module(self.norm_name, norm)
        self.relu = _relu(act_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return F.relu(x) if self.relu else x


class FPN(nn.Module):
    """mmdet ``models/necks/fpn.py`` ``FPN``: 1×1 lateral ``ConvModule``s, top-down
    ``laterals[i-1] += interpolate(laterals[i], size=…)`` (``upsample_cfg``, nearest by default),
    3×3 output ``ConvModule``s; extra levels by ``max_pool2d(out, 1, stride=2)`` when
    ``add_extra_convs=False`` (Faster / Mask R-CNN), else stride-2 3×3 convs on the input, lateral or
    output (RetinaNet's options). Norm and activation: mmdet's defaults (none)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, add_extra_convs=False, relu_before_extra_convs: bool = False,
                 no_norm_on_lateral: bool = False, conv_cfg=None, norm_cfg=None, act_cfg=None,
                 upsample_cfg=None, **rest):
        super().__init__()
        _check_keys("FPN", rest, set())
        in_channels = list(in_channels)
        self.num_outs, self.start_level = int(num_outs), int(start_level)
        self.upsample_cfg = dict(upsample_cfg or dict(mode="nearest"))
        self.relu_before_extra_convs = relu_before_extra_convs
        if end_level == -1 or end_level == len(in_channels) - 1:
            self.backbone_end_level = len(in_channels)
        else:
            self.backbone_end_level = end_level + 1
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs not in (False, "on_input", "on_lateral", "on_output"):
            raise _unsupported(f"FPN add_extra_convs={add_extra_convs!r}")
        self.add_extra_convs = add_extra_convs
        self.lateral_convs, self.fpn_convs = nn.ModuleList(), nn.ModuleList()
        for i in range(self.start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvModule(in_channels[i], out_channels, 1, conv_cfg=conv_cfg,
                                                 norm_cfg=None if no_norm_on_lateral else norm_cfg,
                                                 act_cfg=act_cfg))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg,
                                             norm_cfg=norm_cfg, act_cfg=act_cfg))
        extra_levels = self.num_outs - self.backbone_end_level + self.start_level
        if add_extra_convs and extra_levels >= 1:
            for i in range(extra_levels):
                on_input = i == 0 and add_extra_convs == "on_input"
                channels = in_channels[self.backbone_end_level - 1] if on_input else out_channels
                self.fpn_convs.append(ConvModule(channels, out_channels, 3, stride=2, padding=1,
                                                 conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg))

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):  # top-down
            if "scale_factor" in self.upsample_cfg:
                laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                size = laterals[i - 1].shape[2:]
                laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=size, **self.upsample_cfg)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > len(outs):
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                else:
                    source = laterals[-1] if self.add_extra_convs == "on_lateral" else outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    last = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](last))
        return tuple(outs)


class AnchorGenerator:
    """mmdet ``models/task_modules/prior_generators/anchor_generator.py`` ``AnchorGenerator``:
    base anchors ``center ± 0.5·(w, h)`` with ``h_ratio = √ratio``, ``w_ratio = 1/h_ratio``, scale
    major, centre ``center_offset · base_size`` (0: the cell's top-left corner, mmdet's default);
    shifted by ``stride · (x, y)`` over the grid, row-major, every base anchor at each cell
    (``[h·w·A, 4]``)."""

    def __init__(self, strides: Sequence, ratios: Sequence[float], scales: Sequence[float] | None = None,
                 base_sizes: Sequence[int] | None = None, scale_major: bool = True,
                 octave_base_scale=None, scales_per_octave=None, centers=None, center_offset: float = 0.0,
                 **rest):
        _check_keys("AnchorGenerator", rest, {"use_box_type"})
        if centers is not None:
            raise _unsupported("AnchorGenerator centers")
        self.strides = [(s, s) if isinstance(s, (int, float)) else tuple(s) for s in strides]
        self.base_sizes = [min(s) for s in self.strides] if base_sizes is None else list(base_sizes)
        if scales is not None:
            self.scales = torch.Tensor(scales)
        elif octave_base_scale is not None and scales_per_octave is not None:
            octave = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
            self.scales = torch.Tensor(octave * octave_base_scale)
        else:
            raise OvdenseError("AnchorGenerator needs scales or octave_base_scale with scales_per_octave")
        self.ratios = torch.Tensor(ratios)
        self.scale_major, self.center_offset = scale_major, center_offset
        self.base_anchors = [self._base(size) for size in self.base_sizes]

    @property
    def num_base_priors(self) -> int:
        return int(self.base_anchors[0].size(0))

    def _base(self, base_size) -> torch.Tensor:
        w = h = base_size
        x_center, y_center = self.center_offset * w, self.center_offset * h
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (w * w_ratios[:, None] * self.scales[None, :]).view(-1)  # A
            hs = (h * h_ratios[:, None] * self.scales[None, :]).view(-1)  # A
        else:
            ws = (w * self.scales[:, None] * w_ratios[None, :]).view(-1)
            hs = (h * self.scales[:, None] * h_ratios[None, :]).view(-1)
        corners = [x_center - 0.5 * ws, y_center - 0.5 * hs, x_center + 0.5 * ws, y_center + 0.5 * hs]
        return torch.stack(corners, dim=-1)  # A, 4

    def grid_priors(self, sizes: Sequence[tuple[int, int]], dtype, device) -> list[torch.Tensor]:
        out = []
        for level, (feat_h, feat_w) in enumerate(sizes):
            base = self.base_anchors[level].to(device).to(dtype)  # A, 4
            stride_w, stride_h = self.strides[level]
            shift_x = torch.arange(0, feat_w, device=device).to(dtype) * stride_w  # w
            shift_y = torch.arange(0, feat_h, device=device).to(dtype) * stride_h  # h
            xx = shift_x.repeat(shift_y.shape[0])  # h·w (row-major)
            yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)  # h·w
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)  # h·w, 4
            out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))  # h·w·A, 4
        return out


class DeltaXYWHBBoxCoder:
    """mmdet ``models/task_modules/coders/delta_xywh_bbox_coder.py`` ``delta2bbox``: denormalise
    ``d·std + mean``, centre ``(x1+x2)/2 + w·dx``, size ``w·exp(clamp(dw, ±|log(wh_ratio_clip)|))``
    (``wh_ratio_clip`` 16/1000), corners ``centre ± size/2``, clipped to ``[0, W] × [0, H]`` of
    ``max_shape = img_shape`` (the resized image, not the padded batch) when ``clip_border``."""

    def __init__(self, target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(1.0, 1.0, 1.0, 1.0),
                 clip_border: bool = True, add_ctr_clamp: bool = False, ctr_clamp: int = 32, **rest):
        _check_keys("DeltaXYWHBBoxCoder", rest, {"use_box_type"})
        self.means, self.stds = list(target_means), list(target_stds)
        self.clip_border, self.add_ctr_clamp, self.ctr_clamp = clip_border, add_ctr_clamp, ctr_clamp

    def decode(self, rois: torch.Tensor, deltas: torch.Tensor, max_shape=None,
               wh_ratio_clip: float = 16 / 1000) -> torch.Tensor:
        """``rois [N, 4]``, ``deltas [N, 4·k]`` → boxes ``[N, 4·k]``."""
        num_bboxes, num_classes = deltas.size(0), deltas.size(1) // 4
        if num_bboxes == 0:
            return deltas
        deltas = deltas.reshape(-1, 4)  # N·k, 4
        means = deltas.new_tensor(self.means).view(1, -1)
        stds = deltas.new_tensor(self.stds).view(1, -1)
        denorm = deltas * stds + means
        dxy, dwh = denorm[:, :2], denorm[:, 2:]
        rois_ = rois.repeat(1, num_classes).reshape(-1, 4)  # N·k, 4
        pxy = (rois_[:, :2] + rois_[:, 2:]) * 0.5
        pwh = rois_[:, 2:] - rois_[:, :2]
        dxy_wh = pwh * dxy
        max_ratio = np.abs(np.log(wh_ratio_clip))
        if self.add_ctr_clamp:
            dxy_wh = torch.clamp(dxy_wh, max=self.ctr_clamp, min=-self.ctr_clamp)
            dwh = torch.clamp(dwh, max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + dxy_wh
        gwh = pwh * dwh.exp()
        bboxes = torch.cat([gxy - (gwh * 0.5), gxy + (gwh * 0.5)], dim=-1)  # N·k, 4
        if self.clip_border and max_shape is not None:
            bboxes[..., 0::2].clamp_(min=0, max=max_shape[1])
            bboxes[..., 1::2].clamp_(min=0, max=max_shape[0])
        return bboxes.reshape(num_bboxes, -1)  # N, 4·k


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0,
         score_threshold: float = 0.0, max_num: int = -1) -> torch.Tensor:
    """mmcv ``ops/nms.py`` ``nms`` (its ``NMSop``): greedy NMS in descending score order,
    suppressing IoU ``>`` the threshold, areas ``(x2−x1)·(y2−y1)`` (``offset=0``). torchvision's
    CPU/CUDA kernel is the same loop with the same sort; mmcv's ``offset=1`` (old pixel
    convention) has no torchvision equivalent and is refused."""
    from torchvision.ops import nms

    if offset != 0:
        raise _unsupported("nms offset=1")
    if score_threshold > 0:
        valid = scores > score_threshold
        boxes, scores = boxes[valid], scores[valid]
        valid_inds = torch.nonzero(valid, as_tuple=False).squeeze(dim=1)
    inds = nms(boxes, scores, float(iou_threshold))
    if max_num > 0:
        inds = inds[:max_num]
    if score_threshold > 0:
        inds = valid_inds[inds]
    return inds


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, nms_cfg: dict,
                class_agnostic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmcv ``ops/nms.py`` ``batched_nms``: NMS within each ``idxs`` group. Below ``split_thr``
    (10000) boxes, one NMS over boxes shifted by ``idx · (max coordinate + 1)`` (mmcv's own
    offsets, so float rounding is mmcv's, not torchvision's ``batched_nms``'s); above, one NMS per
    group, merged by descending score. Returns ``(boxes [K, 4], scores [K], keep [K])``."""
    cfg = dict(nms_cfg)
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    if class_agnostic:
        boxes_for_nms = boxes
    else:
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))  # K
        boxes_for_nms = boxes + offsets[:, None]  # K, 4
    kind = cfg.pop("type", "nms")
    if kind != "nms":
        raise _unsupported(f"nms type {kind!r}")
    split_thr = cfg.pop("split_thr", 10000)
    if boxes_for_nms.shape[0] < split_thr:
        keep = _nms(boxes_for_nms, scores, **cfg)
        boxes, scores = boxes[keep], scores[keep]
    else:
        max_num = cfg.pop("max_num", -1)
        total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
        scores_after = scores.new_zeros(scores.size())
        for group in torch.unique(idxs):
            mask = (idxs == group).nonzero(as_tuple=False).view(-1)
            kept = _nms(boxes_for_nms[mask], scores[mask], **cfg)
            total_mask[mask[kept]] = True
            scores_after[mask[kept]] = scores[mask][kept]
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        scores, order = scores_after[keep].sort(descending=True)
        keep = keep[order]
        boxes = boxes[keep]
        if max_num > 0:
            keep, boxes, scores = keep[:max_num], boxes[:max_num], scores[:max_num]
    return boxes, scores, keep


def multiclass_nms(multi_bboxes: torch.Tensor, multi_scores: torch.Tensor, score_thr: float, nms_cfg: dict,
                   max_num: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet ``models/layers/bbox_nms.py`` ``multiclass_nms``: every (box, class) pair with score
    ``> score_thr`` (background column dropped), NMS per class (``batched_nms``), the first
    ``max_num``. ``multi_bboxes [R, 4]`` (class-agnostic) or ``[R, 4·C]``; ``multi_scores
    [R, C+1]``. Returns ``(boxes [K, 4], scores [K], labels [K])``."""
    num_classes = multi_scores.size(1) - 1
    if multi_bboxes.shape[1] > 4:
        bboxes = multi_bboxes.view(multi_scores.size(0), -1, 4)  # R, C, 4
    else:
        bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 4)  # R, C, 4
    scores = multi_scores[:, :-1]  # R, C
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1).expand_as(scores)
    bboxes, scores, labels = bboxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)  # R·C
    inds = (scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    if bboxes.numel() == 0:
        return bboxes, scores, labels
    boxes, scores, keep = batched_nms(bboxes, scores, labels, nms_cfg)
    if max_num > 0:
        boxes, scores, keep = boxes[:max_num], scores[:max_num], keep[:max_num]
    return boxes, scores, labels[keep]


class RPNHead(nn.Module):
    """mmdet ``models/dense_heads/rpn_head.py`` ``RPNHead``: ``num_convs`` 3×3 ``ConvModule``s
    (ReLU; one plain conv when ``num_convs == 1``), ReLU, 1×1 ``rpn_cls`` / ``rpn_reg``; test time
    (``_predict_by_feat_single`` + ``_bbox_post_process``): per level the sigmoid scores sorted,
    the top ``nms_pre``, decoded on the anchors and clipped to ``img_shape``; boxes not wider and
    taller than ``min_bbox_size`` dropped; NMS per level (``batched_nms`` with the level ids); the
    first ``max_per_img``."""

    def __init__(self, in_channels: int, anchor_generator: dict, feat_channels: int = 256, num_convs: int = 1,
                 bbox_coder: dict | None = None, num_classes: int = 1, loss_cls: dict | None = None, **rest):
        super().__init__()
        _check_keys("RPNHead", rest, {"test_cfg"})
        if num_classes != 1:
            raise OvdenseError(f"RPNHead has one class, the config gives {num_classes}")
        self.use_sigmoid = dict(loss_cls or dict(use_sigmoid=True)).get("use_sigmoid", False)
        self.cls_out_channels = 1 if self.use_sigmoid else 2
        anchors = dict(anchor_generator)
        if anchors.pop("type", "AnchorGenerator") != "AnchorGenerator":
            raise _unsupported(f"prior generator {anchor_generator.get('type')!r}")
        coder = dict(bbox_coder or {})
        if coder.pop("type", "DeltaXYWHBBoxCoder") != "DeltaXYWHBBoxCoder":
            raise _unsupported(f"box coder {bbox_coder.get('type')!r}")
        self.prior_generator = AnchorGenerator(**anchors)
        self.bbox_coder = DeltaXYWHBBoxCoder(**coder)
        A = self.prior_generator.num_base_priors
        if num_convs > 1:
            self.rpn_conv = nn.Sequential(*[
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1,
                           act_cfg=dict(type="ReLU")) for i in range(num_convs)])
        else:
            self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, A * self.cls_out_channels, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, A * 4, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        scores, deltas = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            scores.append(self.rpn_cls(x))  # B, A·c, h, w
            deltas.append(self.rpn_reg(x))  # B, A·4, h, w
        return scores, deltas

    def predict(self, feats: Sequence[torch.Tensor], metas: Sequence[dict], cfg: dict) -> list[torch.Tensor]:
        """Proposals ``[P, 4]`` per image, in pixels of the resized image, best first."""
        cls_scores, bbox_preds = self(feats)
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = self.prior_generator.grid_priors(sizes, dtype=cls_scores[0].dtype,
                                                  device=cls_scores[0].device)
        return [self._single([c[i].detach() for c in cls_scores], [b[i].detach() for b in bbox_preds], priors,
                             meta, cfg) for i, meta in enumerate(metas)]

    def _single(self, cls_scores, bbox_preds, mlvl_priors, meta: dict, cfg: dict) -> torch.Tensor:
        nms_pre = cfg.get("nms_pre", -1)
        all_deltas, all_priors, all_scores, level_ids = [], [], [], []
        for level, (cls_score, bbox_pred, priors) in enumerate(zip(cls_scores, bbox_preds, mlvl_priors)):
            bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)  # h·w·A, 4
            cls_score = cls_score.permute(1, 2, 0).reshape(-1, self.cls_out_channels)  # h·w·A, c
            scores = cls_score.sigmoid() if self.use_sigmoid else cls_score.softmax(-1)[:, :-1]
            scores = torch.squeeze(scores)  # h·w·A
            if 0 < nms_pre < scores.shape[0]:
                ranked, rank_inds = scores.sort(descending=True)
                top = rank_inds[:nms_pre]
                scores, bbox_pred, priors = ranked[:nms_pre], bbox_pred[top, :], priors[top]
            all_deltas.append(bbox_pred)
            all_priors.append(priors)
            all_scores.append(scores)
            level_ids.append(scores.new_full((scores.size(0),), level, dtype=torch.long))
        bboxes = self.bbox_coder.decode(torch.cat(all_priors), torch.cat(all_deltas),
                                        max_shape=meta["img_shape"])  # P, 4
        scores, level_ids = torch.cat(all_scores), torch.cat(level_ids)
        if cfg.get("min_bbox_size", -1) >= 0:
            w, h = bboxes[:, 2] - bboxes[:, 0], bboxes[:, 3] - bboxes[:, 1]
            valid = (w > cfg["min_bbox_size"]) & (h > cfg["min_bbox_size"])
            if not valid.all():
                bboxes, scores, level_ids = bboxes[valid], scores[valid], level_ids[valid]
        if bboxes.numel() == 0:
            return bboxes.new_zeros(0, 4)
        _, _, keep = batched_nms(bboxes, scores, level_ids, cfg["nms"])
        return bboxes[keep][:cfg["max_per_img"]]


class SingleRoIExtractor(nn.Module):
    """mmdet ``models/roi_heads/roi_extractors/single_level_roi_extractor.py``: each RoI goes to level
    ``clamp(⌊log2(√(w·h) / finest_scale + 1e-6)⌋, 0, L−1)`` and is pooled there by RoIAlign with
    ``spatial_scale = 1 / featmap_stride``. mmcv's ``RoIAlign(aligned=True, sampling_ratio=0)``
    (``ops/roi_align.py``) computes what ``torchvision.ops.roi_align(aligned=True)`` does (the same
    detectron2 kernel; ``tests/test_detector_plain.py`` checks it), so torchvision's op is used."""

    def __init__(self, roi_layer: dict, out_channels: int, featmap_strides: Sequence[int],
                 finest_scale: int = 56, **rest):
        super().__init__()
        _check_keys("SingleRoIExtractor", rest, set())
        layer = dict(roi_layer)
        if layer.pop("type", "RoIAlign") != "RoIAlign" or layer.pop("pool_mode", "avg") != "avg":
            raise _unsupported(f"RoI layer {roi_layer!r}")
        layer.pop("use_torchvision", None)
        size = layer.pop("output_size")
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)
        self.sampling_ratio = int(layer.pop("sampling_ratio", 0))
        self.aligned = bool(layer.pop("aligned", True))
        _check_keys("RoIAlign", layer, set())
        self.out_channels, self.finest_scale = out_channels, finest_scale
        self.featmap_strides = list(featmap_strides)

    @property
    def num_inputs(self) -> int:
        return len(self.featmap_strides)

    def forward(self, feats: Sequence[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``rois [R, 5]`` (batch index, x1, y1, x2, y2) → ``[R, C, s, s]``."""
        from torchvision.ops import roi_align

        rois = rois.type_as(feats[0])
        out = feats[0].new_zeros(rois.size(0), self.out_channels, *self.output_size)  # R, C, s, s
        num_levels = len(feats)

        def pool(level: int, r: torch.Tensor) -> torch.Tensor:
            return roi_align(feats[level], r, self.output_size,
                             spatial_scale=1.0 / self.featmap_strides[level],
                             sampling_ratio=self.sampling_ratio, aligned=self.aligned)

        if num_levels == 1:
            return out if len(rois) == 0 else pool(0, rois)
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))  # R
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        levels = levels.clamp(min=0, max=num_levels - 1).long()  # R
        for level in range(num_levels):
            inds = (levels == level).nonzero(as_tuple=False).squeeze(1)
            if inds.numel() > 0:
                out[inds] = pool(level, rois[inds])
        return out


class ConvFCBBoxHead(nn.Module):
    """mmdet ``models/roi_heads/bbox_heads/convfc_bbox_head.py`` ``ConvFCBBoxHead`` (shared convs,
    flatten, shared FCs with ReLU, then cls / reg branches of convs and FCs) with F-ViT's open
    vocabulary head on top (``ovdense/mm/detection.py`` ``OvdenseFViTBBoxHead``): ``fc_cls`` maps to
    the joint space ``D``, ``OpenVocabClassifier`` scores it against the text, and the eval output
    is probabilities — softmax, then F-ViT's ensemble with the CLIP region scores when given.
    Class-agnostic regression (``fc_reg`` → 4)."""

    def __init__(self, embed_dim: int, in_channels: int = 256, roi_feat_size=7, num_classes: int = 80,
                 num_shared_convs: int = 0, num_shared_fcs: int = 0, num_cls_convs: int = 0,
                 num_cls_fcs: int = 0, num_reg_convs: int = 0, num_reg_fcs: int = 0,
                 conv_out_channels: int = 256, fc_out_channels: int = 1024, conv_cfg=None, norm_cfg=None,
                 bbox_coder: dict | None = None, reg_class_agnostic: bool = False,
                 with_avg_pool: bool = False, with_cls: bool = True, with_reg: bool = True,
                 alpha: float = 0.1, beta: float = 0.8, vlm_temperature: float = 75.0,
                 temperature: float = 50.0, learn_temperature: bool = True, ensemble: bool = True,
                 cls_predictor_cfg=None, reg_predictor_cfg=None, **rest):
        super().__init__()
        _check_keys("OvdenseFViTBBoxHead", rest, set())
        if not reg_class_agnostic or with_avg_pool or not with_cls or not with_reg:
            raise _unsupported("a box head other than class-agnostic, with cls and reg branches, no avg pool")
        for name, cfg in (("cls_predictor_cfg", cls_predictor_cfg), ("reg_predictor_cfg", reg_predictor_cfg)):
            if cfg is not None and dict(cfg).get("type") != "Linear":
                raise _unsupported(f"{name} {cfg!r}")
        if (num_cls_convs > 0 or num_reg_convs > 0) and num_shared_fcs:
            raise OvdenseError("ConvFCBBoxHead: branch convs need num_shared_fcs == 0")
        size = (roi_feat_size, roi_feat_size) if isinstance(roi_feat_size, int) else tuple(roi_feat_size)
        self.roi_feat_area = size[0] * size[1]
        self.conv_out_channels, self.fc_out_channels = conv_out_channels, fc_out_channels
        self.conv_cfg, self.norm_cfg = conv_cfg, norm_cfg
        self.num_shared_fcs = num_shared_fcs
        self.shared_convs, self.shared_fcs, shared_out = self._branch(num_shared_convs, num_shared_fcs,
                                                                      in_channels, True)
        self.cls_convs, self.cls_fcs, cls_last = self._branch(num_cls_convs, num_cls_fcs, shared_out)
        self.reg_convs, self.reg_fcs, reg_last = self._branch(num_reg_convs, num_reg_fcs, shared_out)
        if num_shared_fcs == 0:
            if num_cls_fcs == 0:
                cls_last *= self.roi_feat_area
            if num_reg_fcs == 0:
                reg_last *= self.roi_feat_area
        self.fc_cls = nn.Linear(cls_last, embed_dim)
        self.fc_reg = nn.Linear(reg_last, 4)
        self.classifier = OpenVocabClassifier(embed_dim, temperature, learn_temperature)
        coder = dict(bbox_coder or {})
        if coder.pop("type", "DeltaXYWHBBoxCoder") != "DeltaXYWHBBoxCoder":
            raise _unsupported(f"box coder {bbox_coder.get('type')!r}")
        self.bbox_coder = DeltaXYWHBBoxCoder(**coder)
        self.alpha, self.beta, self.ensemble = alpha, beta, ensemble
        self.vlm_temperature = float(vlm_temperature)

    def _branch(self, num_convs: int, num_fcs: int, in_channels: int, shared: bool = False):
        """``ConvFCBBoxHead._add_conv_fc_branch``."""
        last = in_channels
        convs = nn.ModuleList()
        for i in range(num_convs):
            convs.append(ConvModule(last if i == 0 else self.conv_out_channels, self.conv_out_channels, 3,
                                    padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                    act_cfg=dict(type="ReLU")))
        if num_convs:
            last = self.conv_out_channels
        fcs = nn.ModuleList()
        if num_fcs > 0:
            if shared or self.num_shared_fcs == 0:
                last *= self.roi_feat_area
            for i in range(num_fcs):
                fcs.append(nn.Linear(last if i == 0 else self.fc_out_channels, self.fc_out_channels))
            last = self.fc_out_channels
        return convs, fcs, last

    def forward(self, x: torch.Tensor, text: torch.Tensor, seen: torch.Tensor,
                region_clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [R, C, s, s]`` → probabilities ``[R, C+1]`` (background last) and deltas ``[R, 4]``."""
        for conv in self.shared_convs:
            x = conv(x)
        if self.num_shared_fcs > 0:
            x = x.flatten(1)  # R, C·s·s
            for fc in self.shared_fcs:
                x = F.relu(fc(x))
        x_cls = x_reg = x
        for conv in self.cls_convs:
            x_cls = conv(x_cls)
        if x_cls.dim() > 2:
            x_cls = x_cls.flatten(1)
        for fc in self.cls_fcs:
            x_cls = F.relu(fc(x_cls))
        for conv in self.reg_convs:
            x_reg = conv(x_reg)
        if x_reg.dim() > 2:
            x_reg = x_reg.flatten(1)
        for fc in self.reg_fcs:
            x_reg = F.relu(fc(x_reg))
        regions, bbox_pred = self.fc_cls(x_cls), self.fc_reg(x_reg)  # R, D and R, 4
        probabilities = torch.softmax(self.classifier(regions, text), dim=-1)  # R, C+1
        if region_clip is not None and self.ensemble:
            columns = self.classifier.columns(text)  # C+1, D
            vlm = vlm_probabilities(region_clip, columns, self.vlm_temperature)
            probabilities = ensemble(probabilities, vlm, seen, self.alpha, self.beta)
        return probabilities, bbox_pred


class FCNMaskHead(nn.Module):
    """mmdet ``models/roi_heads/mask_heads/fcn_mask_head.py`` ``FCNMaskHead`` (class-agnostic, the
    only kind that serves any vocabulary): ``num_convs`` 3×3 ``ConvModule``s, the upsample (a
    stride-2 deconv + ReLU by default; nearest/bilinear), ``conv_logits`` 1×1 → ``[K, 1, 2s, 2s]``.
    ``paste`` is its ``_predict_by_feat_single`` + ``_do_paste_mask`` on CPU: sigmoid, boxes divided
    by the scale factor, each mask ``grid_sample``d (``align_corners=False``) into its box's pixel
    window ``[⌊x1⌋−1, ⌈x2⌉+1)`` (mmdet's ``skip_empty``), thresholded ``≥ mask_thr_binary``.
    Departure: mmdet on a GPU pastes in chunks over the whole image; this path always pastes box
    by box as mmdet does on CPU (values differ only outside a box's one-pixel margin)."""

    def __init__(self, num_convs: int = 4, roi_feat_size: int = 14, in_channels: int = 256,
                 conv_kernel_size: int = 3, conv_out_channels: int = 256, num_classes: int = 80,
                 class_agnostic: bool = False, upsample_cfg: dict | None = None, conv_cfg=None, norm_cfg=None,
                 predictor_cfg=None, **rest):
        super().__init__()
        _check_keys("FCNMaskHead", rest, set())
        if not class_agnostic:
            raise _unsupported("a mask head that is not class_agnostic (masks for any vocabulary need it)")
        if predictor_cfg is not None and dict(predictor_cfg).get("type") not in ("Conv", "Conv2d"):
            raise _unsupported(f"mask predictor {predictor_cfg!r}")
        upsample = dict(upsample_cfg or dict(type="deconv", scale_factor=2))
        self.upsample_method = upsample.pop("type")
        self.scale_factor = upsample.pop("scale_factor", None)
        self.convs = nn.ModuleList(
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, conv_kernel_size,
                       padding=(conv_kernel_size - 1) // 2, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=dict(type="ReLU")) for i in range(num_convs))
        upsample_in = conv_out_channels if num_convs > 0 else in_channels
        if self.upsample_method == "deconv":
            self.upsample = nn.ConvTranspose2d(upsample_in, conv_out_channels, self.scale_factor,
                                               stride=self.scale_factor)
            logits_in = conv_out_channels
        elif self.upsample_method in (None, "nearest", "bilinear"):
            self.upsample = None
            logits_in = upsample_in
        else:
            raise _unsupported(f"mask upsample {self.upsample_method!r}")
        self.conv_logits = nn.Conv2d(logits_in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        if self.upsample_method == "deconv":
            x = F.relu(self.upsample(x))
        elif self.upsample_method is not None:
            x = F.interpolate(x, scale_factor=self.scale_factor, mode=self.upsample_method,
                              align_corners=None if self.upsample_method == "nearest" else False)
        return self.conv_logits(x)  # K, 1, 2s, 2s

    @staticmethod
    def paste(mask_logits: torch.Tensor, bboxes: torch.Tensor, meta: dict, threshold: float) -> torch.Tensor:
        """``mask_logits [K, 1, m, m]``, ``bboxes [K, 4]`` in resized pixels (divided by the scale
        factor in place, as mmdet) → bool masks ``[K, H, W]`` at ``ori_shape``."""
        scale = bboxes.new_tensor(meta["scale_factor"]).repeat((1, 2))  # 1, 4
        img_h, img_w = meta["ori_shape"][:2]
        probs = mask_logits.sigmoid()
        bboxes /= scale
        N = len(probs)
        out = torch.zeros(N, img_h, img_w, device=bboxes.device,
                          dtype=torch.bool if threshold >= 0 else torch.uint8)  # K, H, W
        for inds in torch.chunk(torch.arange(N, device=bboxes.device), N):
            chunk, window = _paste_masks(probs[inds], bboxes[inds], img_h, img_w)
            chunk = (chunk >= threshold).to(torch.bool) if threshold >= 0 else (chunk * 255).to(torch.uint8)
            out[(inds,) + window] = chunk
        return out


def _paste_masks(masks: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int):
    """mmdet ``fcn_mask_head.py`` ``_do_paste_mask`` with ``skip_empty=True``: the masks
    ``[n, 1, m, m]`` resampled onto the pixel window around the boxes ``[n, 4]``."""
    x0_int, y0_int = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
    x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
    y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # n, 1 each
    n = masks.shape[0]
    img_y = torch.arange(y0_int, y1_int, device=masks.device).to(torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, device=masks.device).to(torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # n, h'
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1  # n, w'
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))  # n, h', w'
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))  # n, h', w'
    grid = torch.stack([gx, gy], dim=3)  # n, h', w', 2
    pasted = F.grid_sample(masks.to(dtype=torch.float32), grid, align_corners=False)  # n, 1, h', w'
    return pasted[:, 0], (slice(y0_int, y1_int), slice(x0_int, x1_int))


def _bbox2roi(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """mmdet ``structures/bbox/transforms.py`` ``bbox2roi``: ``[N, 5]`` rows (image index, x1, y1, x2, y2)."""
    return torch.cat([torch.cat([b.new_full((b.size(0), 1), i), b], dim=-1) for i, b in enumerate(boxes)])


def _pop_type(cfg, expected: str, where: str) -> dict:
    cfg = dict(cfg)
    kind = cfg.pop("type", expected)
    if kind != expected:
        raise _unsupported(f"{where} type {kind!r} (expected {expected})")
    return cfg


class PlainFViT(nn.Module):
    """F-ViT inference in plain torch: what ``ovdense.mm.detection.OvdenseFViT.predict`` computes
    (mmdet 3.3 ``models/detectors/two_stage.py`` ``TwoStageDetector.predict`` → ``RPNHead.predict``
    with ``rescale=False`` → ``StandardRoIHead.predict``: boxes, then masks on the kept boxes),
    built from a head file's config with the same state-dict keys (``backbone.pyramid.*``,
    ``neck.*``, ``rpn_head.*``, ``roi_head.bbox_head.*``, ``roi_head.mask_head.*``).

    Args:
        backbone: the frozen ``ClipBackbone`` (not a submodule, never in ``state_dict``).
        config: the head file's config (``OvdenseFViT.head_config``).
    """

    def __init__(self, backbone, config: dict):
        super().__init__()
        self._frozen = (backbone,)
        self.training_classes = read_classes(config["classes"])
        self.method = config.get("method") or "maskclip"
        indices = config.get("indices")
        self.indices = tuple(indices) if indices is not None else fvit_out_indices(backbone.num_layers)
        self.templates = config.get("templates") or backbone.defaults.get("templates", "imagenet80")
        self.backbone = nn.Module()
        pyramid = _pop_type(config.get("pyramid") or {}, "OvdenseFViTPyramid", "pyramid")
        self.backbone.pyramid = SimplePyramid(backbone.width, **pyramid)
        self.neck = FPN(**_pop_type(config["neck"], "FPN", "neck"))
        self.rpn_head = RPNHead(**_pop_type(config["rpn_head"], "RPNHead", "rpn_head"))
        roi = _pop_type(config["roi_head"], "OvdenseFViTRoIHead", "roi_head")
        self.roi_head = nn.Module()
        self.bbox_roi_extractor = SingleRoIExtractor(**_pop_type(roi.pop("bbox_roi_extractor"),
                                                                 "SingleRoIExtractor", "bbox_roi_extractor"))
        box = _pop_type(roi.pop("bbox_head"), "OvdenseFViTBBoxHead", "bbox_head")
        if box.get("vlm_temperature", 75.0) is None:  # the backbone's own CLIP temperature (OvdenseFViT)
            box["vlm_temperature"] = backbone.logit_scale
        self.roi_head.bbox_head = ConvFCBBoxHead(embed_dim=backbone.embed_dim, **box)
        self.with_mask = roi.get("mask_head") is not None
        if self.with_mask:
            extractor = _pop_type(roi.pop("mask_roi_extractor"), "SingleRoIExtractor", "mask_roi_extractor")
            self.mask_roi_extractor = SingleRoIExtractor(**extractor)
            mask = _pop_type(roi.pop("mask_head"), "FCNMaskHead", "mask_head")
            self.roi_head.mask_head = FCNMaskHead(**mask)
        _check_keys("OvdenseFViTRoIHead", {k: v for k, v in roi.items() if v is not None},
                    {"shared_head", "mask_head", "mask_roi_extractor"})
        if roi.get("shared_head") is not None:
            raise _unsupported("a shared RoI head")
        self.test_cfg = dict(config.get("test_cfg") or {})
        needed = {"rpn": ("nms", "max_per_img"), "rcnn": ("score_thr", "nms", "max_per_img")
                  + (("mask_thr_binary",) if self.with_mask else ())}
        absent = [f"test_cfg.{part}.{key}" for part, keys in needed.items() for key in keys
                  if key not in (self.test_cfg.get(part) or {})]
        if absent:
            raise OvdenseError(f"the head's config lacks {', '.join(absent)}; export it from a model built "
                               "with a full test_cfg (configs/ovdet/)")

    @property
    def clip(self):
        return self._frozen[0]

    def features(self, inputs: torch.Tensor, with_clip_map: bool
                 ) -> tuple[tuple[torch.Tensor, ...], FrozenFeatures]:
        """``OvdenseFViT.extract_feat``: the frozen pass, the pyramid, the FPN."""
        frozen = frozen_features(self.clip, inputs, self.indices, self.method, with_clip_map=with_clip_map)
        return self.neck(self.backbone.pyramid(frozen.levels)), frozen

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, metas: Sequence[dict], text: torch.Tensor, seen: torch.Tensor,
                ensemble: bool = True, rescale: bool = True) -> list[dict[str, torch.Tensor]]:
        """Detections per image, as mmdet's ``pred_instances``.

        Args:
            inputs: normalised, padded ``[B, 3, Hp, Wp]`` (``Detector.preprocess``).
            metas: per image ``img_shape`` (resized ``(h, w)``), ``ori_shape`` ``(H, W)`` and
                ``scale_factor`` ``(w/W, h/H)``, as mmdet's.
            text: the vocabulary's text embeddings ``[C, D]``; seen: ``[C]`` bool (training classes).
            ensemble: F-ViT's CLIP term on.
        Returns:
            dicts with ``bboxes [K, 4]``, ``scores [K]``, ``labels [K]`` and, with a mask head,
            ``masks [K, H, W]`` bool (at ``ori_shape`` when ``rescale``).
        """
        x, frozen = self.features(inputs, with_clip_map=ensemble)
        proposals = self.rpn_head.predict(x, metas, self.test_cfg["rpn"])
        rcnn = self.test_cfg["rcnn"]
        head = self.roi_head.bbox_head
        rois = _bbox2roi(proposals)  # R, 5
        empty = [dict(bboxes=rois.new_zeros(0, 4), scores=rois.new_zeros(0),
                      labels=torch.zeros(0, dtype=torch.long, device=rois.device)) for _ in metas]
        if rois.shape[0] == 0:
            results = empty
        else:
            feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs], rois)  # R, C, s, s
            region_clip = region_clip_embeddings(frozen.clip_map, rois, frozen.stride) if ensemble else None
            scores, deltas = head(feats, text, seen, region_clip)  # R, C+1 and R, 4
            counts = [len(p) for p in proposals]
            results = []
            for roi, score, delta, meta in zip(rois.split(counts), scores.split(counts), deltas.split(counts),
                                               metas):
                if roi.shape[0] == 0:
                    results.append(dict(empty[0]))
                    continue
                bboxes = head.bbox_coder.decode(roi[:, 1:], delta.view(-1, 4), max_shape=meta["img_shape"])
                if rescale and not self.with_mask:  # mmdet rescales here only without a mask head
                    bboxes = bboxes * bboxes.new_tensor([1 / s for s in meta["scale_factor"]]).repeat((1, 2))
                boxes, kept_scores, labels = multiclass_nms(bboxes, score, rcnn["score_thr"], rcnn["nms"],
                                                            rcnn["max_per_img"])
                results.append(dict(bboxes=boxes, scores=kept_scores, labels=labels))
        if self.with_mask:
            self._predict_masks(x, metas, results, rcnn, rescale)
        return results

    def _predict_masks(self, x, metas, results, rcnn: dict, rescale: bool) -> None:
        """``StandardRoIHead.predict_mask`` + ``FCNMaskHead.predict_by_feat``."""
        if not rescale:
            raise _unsupported("masks without rescale")
        boxes = [r["bboxes"] for r in results]
        rois = _bbox2roi(boxes)  # K, 5
        threshold = rcnn["mask_thr_binary"]
        if rois.shape[0] == 0:
            for r, meta in zip(results, metas):
                scale = r["bboxes"].new_tensor(meta["scale_factor"]).repeat((1, 2))
                r["bboxes"] = r["bboxes"] / scale
                r["masks"] = torch.zeros(0, *meta["ori_shape"][:2], dtype=torch.bool, device=rois.device)
            return
        feats = self.mask_roi_extractor(x[:self.mask_roi_extractor.num_inputs], rois)  # K, C, s, s
        logits = self.roi_head.mask_head(feats).split([len(b) for b in boxes])  # K, 1, 2s, 2s
        for r, mask_logits, meta in zip(results, logits, metas):
            if r["bboxes"].shape[0] == 0:
                r["masks"] = torch.zeros(0, *meta["ori_shape"][:2], dtype=torch.bool, device=rois.device)
            else:
                # paste also rescales r["bboxes"] in place, as mmdet
                r["masks"] = FCNMaskHead.paste(mask_logits, r["bboxes"], meta, threshold)


# --------------------------------------------------------------------------------------------
# The Python API

#: The toy backbone's trained head, shipped in ``ovdense/assets`` (trained by
#: ``configs/ovdet/fvlm_toy_synthetic.py`` on the toy world's base classes).
TOY_HEAD_FILE = "fvit-toy-head.safetensors"


def default_head_checkpoint(backbone) -> Path | None:
    """The F-ViT head that ships with ovdense for ``backbone``: ``ovdense/assets/fvit-toy-head.safetensors``
    for the toy CLIP when the file is installed; ``None`` otherwise (no other backbone ships one)."""
    from ovdense.backbone.clip import ASSETS, TOY_NAME

    if backbone.name == TOY_NAME:
        path = ASSETS / TOY_HEAD_FILE
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

    def to_json(self) -> dict:
        """These detections as ``ovdense detect`` writes them: ``{"classes": [...], "detections": [...]}``,
        one entry per detection (score order) with the COCO results fields ``bbox`` ``[x, y, w, h]``
        (input-image pixels), ``category_id`` (index into ``classes``), ``score`` and, for a head
        with masks, ``segmentation`` (compressed COCO RLE, ``ovdense.data.rle``), plus ``class`` (the
        name)."""
        from ovdense.data import rle

        detections = []
        for k in range(len(self.scores)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[k])
            class_id = int(self.class_ids[k])
            entry = {"bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                     "category_id": class_id, "class": self.classes[class_id],
                     "score": round(float(self.scores[k]), 6)}
            if self.masks is not None:
                entry["segmentation"] = rle.encode(self.masks[k])
            detections.append(entry)
        return {"classes": list(self.classes), "detections": detections}


class Detector:
    """Detect and segment any words with a trained F-ViT head on the shared backbone, in plain torch
    (``PlainFViT``: no mmcv, mmdet or mmengine needed).

    Args:
        backbone: the ``ClipBackbone`` the head was trained on (checked against the head file).
        classes: any class names; those outside the head's training vocabulary get β.
        head_checkpoint: a head written by ``ovdense.mm.detection.export_head`` /
            ``ExportFViTHeadHook``; ``None``: ``default_head_checkpoint(backbone)`` (the toy's).
        score_threshold: drop detections below this score (after mmdet's own ``score_thr``).
        image_size: the long side images are resized to (default: the backbone's ``short_side``
            default for the toy, else 640, F-ViT's OV-COCO size).
        ensemble: F-ViT's CLIP ensemble on (``False``: the detector's own scores).

    Preprocessing is what the mmdet path did: the long side resized to ``image_size`` (bilinear,
    ``cv2.INTER_LINEAR``), mmdet's ``DetDataPreprocessor`` (RGB, ``(x − 255·mean) / (255·std)``,
    zero padding bottom/right to a multiple of ``2p``); boxes and masks come back in pixels of
    the input image.
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
        if image_size is not None and (int(image_size) != image_size or image_size < 2 * backbone.patch_size):
            raise OvdenseError(f"image_size must be an integer ≥ {2 * backbone.patch_size}, got {image_size}")
        classes = check_vocabulary(classes)
        state, config = load_head(head_checkpoint, backbone)
        try:
            model = PlainFViT(backbone, config)
        except (KeyError, TypeError, ValueError) as e:
            raise OvdenseError(f"{head_checkpoint}: its config does not build an F-ViT ({type(e).__name__}: "
                               f"{e}); write heads with ovdense.mm.detection.export_head") from e
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            raise OvdenseError(f"{head_checkpoint} does not fit its own configuration: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}; "
                               "was it written by another ovdense version?")
        model.load_state_dict(state, strict=True)
        self.backbone = backbone
        self.model = model.to(backbone.device).eval()
        self.classes = classes
        self.ensemble = bool(ensemble)
        self.score_threshold = float(score_threshold)
        self.image_size = int(image_size or backbone.defaults.get("short_side", 640))
        self.text = backbone.encode_text(classes, model.templates).float()  # C, D
        self.seen = seen_mask(classes, model.training_classes).to(self.text.device)  # C
        # mmdet's DetDataPreprocessor: mean/std in 0–255 units, as float32 tensors
        self.mean = torch.tensor([255 * m for m in backbone.mean]).view(-1, 1, 1)  # 3, 1, 1
        self.std = torch.tensor([255 * s for s in backbone.std]).view(-1, 1, 1)  # 3, 1, 1

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict]:
        """An RGB ``uint8 [H, W, 3]`` image → the network input ``[1, 3, Hp, Wp]`` and its meta."""
        import cv2

        H, W = rgb.shape[:2]
        factor = self.image_size / max(H, W)
        h, w = max(1, int(H * factor + 0.5)), max(1, int(W * factor + 0.5))
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()  # 3, h, w (RGB)
        x = (x - self.mean) / self.std
        divisor = 2 * self.backbone.patch_size
        pad_h, pad_w = -h % divisor, -w % divisor
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)[None]  # 1, 3, Hp, Wp
        meta = dict(img_shape=(h, w), ori_shape=(H, W), scale_factor=(w / W, h / H))
        return x.to(self.backbone.device), meta

    @torch.no_grad()
    def predict(self, image) -> DetectionResult:
        """Detect in one image (a path, PIL image or RGB ``uint8`` array)."""
        from ovdense.io import load_image

        x, meta = self.preprocess(load_image(image))
        pred = self.model.predict(x, [meta], self.text, self.seen, ensemble=self.ensemble)[0]
        keep = pred["scores"] >= self.score_threshold
        masks = pred["masks"][keep].cpu().numpy().astype(bool) if "masks" in pred else None
        return DetectionResult(boxes=pred["bboxes"][keep].cpu().numpy(),
                               scores=pred["scores"][keep].cpu().numpy(),
                               class_ids=pred["labels"][keep].cpu().numpy(), masks=masks,
                               classes=list(self.classes))
