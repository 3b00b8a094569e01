"""F-ViT's own parts on the frozen shared backbone: the frozen pass, the simple pyramid, the
open-vocabulary classifier and box head, the vocabulary's text (encoded, or stored with a published
head), CLIP's region scores and the ensemble.

The papers, the official files followed and the departures are in ``ovdense.heads.fvit``'s
docstring (the head's public face, which re-exports these names); the generic two-stage parts
(FPN, RPN, RoI extractor, box and mask heads, NMS) are ``ovdense.detection``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone import dense
from ovdense.backbone.runner import embed, run_blocks
from ovdense.detection.necks import make_norm
from ovdense.detection.roi_heads import ConvFCBBoxHead
from ovdense.errors import OvdenseError

#: F-ViT's taps for the 12-block B/16 (0-indexed); see ``fvit_out_indices``.
FVIT_B16_INDICES = (3, 5, 7, 11)
#: F-ViT / CLIM ensemble weights: OV-COCO (B/16 and L/14) and OV-LVIS B/16.
OV_COCO = dict(alpha=0.1, beta=0.8, vlm_temperature=75.0)
OV_LVIS_B16 = dict(alpha=0.1, beta=0.6, vlm_temperature=50.0)


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
# The vocabulary's text: encoded by the backbone, or stored with a published head


@dataclass
class StoredText:
    """Class text embeddings that a head file brings with it: the ones its head was trained against.

    Why a head carries them: a published head's classifier (and its learned background column) was
    trained on its authors' text embeddings, and ovdense cannot always recompute them. CLIM's
    OV-COCO model (wusize/CLIM ``ovdet``) was trained on ``coco_openai_vitb16_hand_craft.npy``: 63
    hand-crafted ViLD templates with an ``{article}`` (a/an, per name) and a "This is " prefix on the
    prompts that start with "a" or "the" (``ovdet/tools/generate_text_embeddings.py``), which
    ovdense's templates (one ``{}``, ``str.format``) cannot express; and it was probably encoded with
    OpenAI's QuickGELU text tower (the script's default ``--pretrained openai``), while the detector's
    image tower runs with exact GELU (CLIM's open_clip fork builds a CLIP loaded from a file with
    ``nn.GELU``) — and an ovdense backbone has one activation for both towers, so the one built for
    the detector (from a file: GELU) would not reproduce those rows. They are therefore kept as
    published and used as they are (not renormalised, as CLIM's ``pred_cls_logits``).

    Attributes:
        names: ``V`` class names, one per row, each once.
        embeddings: ``[V, D]`` float32 (CLIM's rows are L2-normalised).
        source: one line saying where the rows come from and how they were made.
    """

    names: list[str]
    embeddings: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.names):
            raise OvdenseError(f"stored text embeddings must be [{len(self.names)}, D], one row per name, "
                               f"not {tuple(self.embeddings.shape)}")
        if len(set(self.names)) != len(self.names):
            raise OvdenseError("stored text embeddings name a class twice")
        self.embeddings = self.embeddings.detach().float().cpu()

    def rows(self, classes: Sequence[str]) -> list[int | None]:
        """For each class, its row, or ``None``: names match exactly (as ``seen_mask`` does, so a
        stored class and a training class are told apart by the same rule)."""
        index = {name: i for i, name in enumerate(self.names)}
        return [index.get(c) for c in classes]


def vocabulary_text(backbone, classes: Sequence[str], templates, stored: StoredText | None = None
                    ) -> tuple[torch.Tensor, list[str]]:
    """A vocabulary's text embeddings ``[C, D]`` (float32, on the backbone's device) and, per class,
    where its row came from: ``"stored"`` (the head's ``StoredText`` row of that name) or
    ``"encoded"`` (``backbone.encode_text(…, templates)``, as for every head without stored text).

    Mixing the two is what a published head allows: its own names keep the rows it was trained
    with, other words get the backbone's (another prompt recipe, and for CLIM another activation:
    see ``StoredText``), so their scores are comparable only roughly."""
    rows = stored.rows(classes) if stored is not None else [None] * len(classes)
    others = [c for c, r in zip(classes, rows) if r is None]
    encoded = iter(backbone.encode_text(others, templates).float()) if others else iter(())  # C', D
    picked = [stored.embeddings[r].to(backbone.device) if r is not None else next(encoded) for r in rows]
    return torch.stack(picked), ["encoded" if r is None else "stored" for r in rows]  # C, D


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


# --------------------------------------------------------------------------------------------
# The box head: mmdet's ConvFCBBoxHead with the classifier and the ensemble


class OpenVocabBBoxHead(ConvFCBBoxHead):
    """F-ViT's box head in plain torch (``ovdense/mm/detection.py`` ``OvdenseFViTBBoxHead``, F-ViT
    ``FViTBBoxHead``): mmdet's ``ConvFCBBoxHead`` whose ``fc_cls`` maps to the joint space ``D``,
    scored against the text by ``OpenVocabClassifier`` (``classifier.*`` in the state dict). The
    eval output is probabilities: softmax, then F-ViT's ensemble with the CLIP region scores when
    given. Class-agnostic regression (``fc_reg`` → 4).
    """

    config_type = "OvdenseFViTBBoxHead"

    def __init__(self, embed_dim: int, alpha: float = 0.1, beta: float = 0.8, vlm_temperature: float = 75.0,
                 temperature: float = 50.0, learn_temperature: bool = True, ensemble: bool = True, **box):
        super().__init__(cls_out_channels=embed_dim, **box)
        self.classifier = OpenVocabClassifier(embed_dim, temperature, learn_temperature)
        self.alpha, self.beta, self.ensemble = alpha, beta, ensemble
        self.vlm_temperature = float(vlm_temperature)

    def forward(self, x: torch.Tensor, text: torch.Tensor, seen: torch.Tensor,
                region_clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [R, C, s, s]`` → probabilities ``[R, C+1]`` (background last) and deltas ``[R, 4]``."""
        regions, bbox_pred = super().forward(x)  # R, D and R, 4
        probabilities = torch.softmax(self.classifier(regions, text), dim=-1)  # R, C+1
        if region_clip is not None and self.ensemble:
            columns = self.classifier.columns(text)  # C+1, D
            vlm = vlm_probabilities(region_clip, columns, self.vlm_temperature)
            probabilities = ensemble(probabilities, vlm, seen, self.alpha, self.beta)
        return probabilities, bbox_pred
