"""SAN: the side adapter network on the shared frozen CLIP backbone.

Xu et al., "Side Adapter Network for Open-Vocabulary Semantic Segmentation", CVPR 2023. The
official code is MendelXu/SAN (detectron2): ``san/model/san.py`` (the model),
``san/model/side_adapter/side_adapter.py`` (``RegionwiseSideAdapterNetwork``, ``MLPMaskDecoder``),
``san/model/layers.py`` (``AddFusion``, ``MLP``), ``san/model/clip_utils/visual.py``
(``FeatureExtractor``, ``RecWithAttnbiasHead._build_attn_biases``) and
``san/model/clip_utils/classifier.py`` (``LearnableBgOvClassifier``); mmsegmentation 1.2.2
re-implements it as ``SideAdapterCLIPHead`` + ``MultimodalEncoderDecoder``. This file follows the
two where they agree and the official code where they differ (said where it happens).

For an image ``I`` (normalised, ``H × W`` multiples of 32) and ``C`` class embeddings ``t_c``:

1. CLIP input ``I' = bilinear(I, ×s)`` (``s`` = 0.5; 0.7 for ViT-L/14-336, the official
   ``CLIP_RESOLUTION``). The trunk runs CLIP's first ``K`` blocks unchanged (9 of 12 for B/16,
   18 of 24 for L/14, ``FEATURE_LAST_LAYER_IDX``) with SAN's own trained copy of the position
   embedding (bicubic to the grid by size, ``resize_pos_embed2d``), keeping the tokens
   ``F_j`` after ``ln_pre`` (``j = 0``) and after blocks ``j`` (1-indexed: 3, 6, 9 for B/16).
2. Side network on ``I``: a plain ViT (patch 16, width 240, 6 heads, MLP 960, 8 blocks, no
   class token, no final norm) over ``[Q queries; patches]``; ``x₀ = [q; P] + [e_q; e_P]`` and
   after every block but the last the position embeddings are added again. The fusion map
   ``j → i`` ("0→0, 3→1, 6→2, 9→3") adds ``resize(Conv1×1(LN2d(F_j)))`` (bilinear to the side
   grid) to the patch tokens after side block ``i`` (``i = 0``: before the first block).
3. MLP mask decoder on the tokens after side blocks 7 and 8 (3 layers, ReLU, 240 → 256):
   ``q' = MLP_q(q)``, ``P' = MLP_p(P)``, masks ``M = ⟨q', P'⟩`` at 1/16, and per CLIP head
   ``n`` the attention bias ``B_n = a·⟨q', MLP_b(P)_n⟩ + b`` (``a, b`` one learned scalar pair).
4. Recognition: ``Q`` [SOS] tokens, copies of the trunk's class token, run through CLIP's last
   blocks (3 for B/16) together with ``[cls; patches]`` under the mask of ``_build_attn_biases``:
   ``B`` max-pooled to the CLIP grid; [SOS]ᵢ → patches: ``B``; [SOS]ᵢ → [SOS]ᵢ: 0; every
   token → another [SOS] and [SOS] → cls: −100; cls/patches → cls/patches: 0. Then ``ln_post``
   and ``proj``: embeddings ``e_q``.
5. Class logits ``exp(τ)·cos(e_q, t_c)`` over ``[t_1 … t_C; t_void]`` (a learned void
   embedding appended, the set renormalised; ``τ`` CLIP's logit scale); semantic scores
   ``S_c = Σ_q softmax(logits_q)_c · sigmoid(M_q)`` for ``c < C``, at the image's resolution.

What SAN trains lives in ``SanHead`` (side network, fusion, decoder, the CLIP position
embedding copy, the void embedding: 8.37 M parameters for B/16); the CLIP weights stay the
backbone's and never enter the head's state dict or optimizer.

Departures from mmseg 1.2.2, following the official code: SanSegmenter resizes the mask
logits to the image before the sigmoid (``sem_seg_postprocess`` before ``semantic_inference``,
``SEM_SEG_POSTPROCESS_BEFORE_INFERENCE = True``) where mmseg resizes the semantic scores.
ovdense additions: classes may have synonyms (each synonym is a prompt; a class's score is
the max over its synonyms); a CLIP input that is not a patch multiple is cropped to one
(the official ``conv1`` drops the same remainder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.clip import ASSETS, TOY_NAME, ClipBackbone
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.backbone.runner import embed, run_blocks
from ovdense.errors import OvdenseError
from ovdense.heads.training_free import SegmentationResult, rescale_size
from ovdense.io import ImageInput, load_image, write_bytes

# ViLD's prompt templates (Gu et al., ICLR 2022), the official SAN's ``CLIP_TEMPLATE_SET = "vild"``
# (``san/model/clip_utils/utils.py``) and mmseg's ``get_predefined_templates('vild')``.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

HEAD_FORMAT = "ovdense-san-head"
TEST_LONG_SIDE = 2560  # MAX_SIZE_TEST of the official config (mmseg: ResizeShortestEdge max_size)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SanConfig:
    """SAN's hyperparameters; the defaults are the official ViT-B/16 config
    (``san/config.py`` + ``configs/san_clip_vit_res4_coco.yaml``). ``None`` fields follow from
    the backbone (``resolve``): B/16 → trunk 9, taps 0/3/6/9, recognition 3 blocks, scale 0.5;
    L/14 → 18, 0/6/12/18, 6; L/14-336 → scale 0.7; other depths L → recognition ``L // 4``
    blocks, taps evenly spaced over the trunk.

    Attributes:
        num_queries: ``Q``, side queries = [SOS] tokens (``NUM_QUERIES``).
        side_width, side_depth, side_heads, side_patch, side_mlp: the side ViT
            (``vit_w240n6d8_patch16``: width 240, 8 blocks, 6 heads, patch 16, MLP 4×240).
        side_image_size: the side position embedding covers ``side_image_size / side_patch``
            cells a side (``IMAGE_SIZE`` 640 → 40 × 40); other grids are bicubic-resized.
        side_eps: LayerNorm eps of the side ViT and the fusion LN2d (timm / detectron2: 1e-6).
        decoder_channels, decoder_hidden, decoder_layers: the MLP mask decoder
            (``EMBED_CHANNELS`` 256, ``MLP_CHANNELS`` 256, ``MLP_NUM_LAYERS`` 3).
        rescale_attn_bias: the learned ``a·x + b`` on the attention biases (``RESCALE_ATTN_BIAS``).
        supervised: side blocks (1-indexed) whose outputs are decoded in training, deepest last
            (``DEEP_SUPERVISION_IDXS`` [7, 8]); ``None`` = the last two; inference decodes only
            the last.
        trunk_depth: ``K``, CLIP blocks run before recognition (``FEATURE_LAST_LAYER_IDX``).
        clip_taps: CLIP layers fused into the side network, 0 = after ``ln_pre``, ``j`` = after
            block ``j`` (1-indexed as the official ``FUSION_MAP``).
        side_targets: side layers they are added to, 0 = before the first side block.
        clip_scale: ``s``, the CLIP input's scale (``CLIP_RESOLUTION``).
        mask_value: the attention-mask value of ``_build_attn_biases`` (−100).
        size_divisor: test images are padded to a multiple of this (``SIZE_DIVISIBILITY`` 32).
    """

    num_queries: int = 100
    side_width: int = 240
    side_depth: int = 8
    side_heads: int = 6
    side_patch: int = 16
    side_mlp: int = 960
    side_image_size: int = 640
    side_eps: float = 1e-6
    decoder_channels: int = 256
    decoder_hidden: int = 256
    decoder_layers: int = 3
    rescale_attn_bias: bool = True
    supervised: tuple[int, ...] | None = None
    trunk_depth: int | None = None
    clip_taps: tuple[int, ...] | None = None
    side_targets: tuple[int, ...] = (0, 1, 2, 3)
    clip_scale: float | None = None
    mask_value: float = -100.0
    size_divisor: int = 32

    def resolve(self, backbone: ClipBackbone) -> SanConfig:
        """Fill the ``None`` fields from the backbone and check the whole config."""
        depth = backbone.num_layers
        trunk = self.trunk_depth if self.trunk_depth is not None else depth - depth // 4
        if self.clip_taps is not None:
            taps = tuple(int(t) for t in self.clip_taps)
        else:
            n = len(self.side_targets)
            taps = tuple(round(trunk * k / max(n - 1, 1)) for k in range(n))
        scale = self.clip_scale
        if scale is None:
            scale = 0.7 if backbone.native_size == (336, 336) else 0.5
        cfg = replace(
            self, trunk_depth=int(trunk), clip_taps=taps, clip_scale=float(scale),
            supervised=tuple(int(i) for i in (self.supervised or (self.side_depth - 1, self.side_depth))
                             if i >= 1),
            side_targets=tuple(int(i) for i in self.side_targets),
        )
        cfg._check(depth)
        return cfg

    def _check(self, depth: int) -> None:
        def bad(message: str) -> OvdenseError:
            return OvdenseError(f"SanConfig: {message}")

        if not 1 <= self.trunk_depth < depth:
            raise bad(f"trunk_depth must lie in [1, {depth - 1}] for this {depth}-block backbone, "
                      f"got {self.trunk_depth}")
        if len(self.clip_taps) != len(self.side_targets) or not self.clip_taps:
            raise bad(f"clip_taps {self.clip_taps} and side_targets {self.side_targets} must pair up")
        if any(not 0 <= t <= self.trunk_depth for t in self.clip_taps):
            raise bad(f"clip_taps {self.clip_taps} must lie in [0, trunk_depth={self.trunk_depth}]")
        if list(self.side_targets) != sorted(set(self.side_targets)) or not all(
            0 <= i <= self.side_depth for i in self.side_targets
        ):
            raise bad(f"side_targets {self.side_targets} must increase within [0, {self.side_depth}]")
        if not self.supervised or self.supervised[-1] != self.side_depth or list(self.supervised) != sorted(
            set(self.supervised)
        ) or self.supervised[0] < 1:
            raise bad(f"supervised {self.supervised} must increase within [1, {self.side_depth}] and "
                      f"end with side_depth")
        if self.side_width % self.side_heads:
            raise bad(f"side_width {self.side_width} is not a multiple of side_heads {self.side_heads}")
        if not 0 < self.clip_scale <= 1:
            raise bad(f"clip_scale must lie in (0, 1], got {self.clip_scale}")
        for name in ("num_queries", "side_depth", "side_patch", "side_mlp", "side_image_size",
                     "decoder_channels", "decoder_hidden", "decoder_layers", "size_divisor"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be positive, got {getattr(self, name)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SanConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OvdenseError(
                f"the SAN config names unknown fields {unknown}; is the head from a newer ovdense?"
            )
        for key in ("supervised", "clip_taps", "side_targets"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)


class SanOutput(NamedTuple):
    """One decoded side layer: ``mask_logits [B, Q, H/16, W/16]``, ``class_logits [B, Q, C+1]``
    (index ``C`` is void)."""

    mask_logits: torch.Tensor
    class_logits: torch.Tensor


# --------------------------------------------------------------------------------------------
# Building blocks (plain torch)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``[B, C, H, W]`` (``san/model/layers.py`` ``LayerNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SideAttention(nn.Module):
    """timm's ``Attention`` (qkv bias on): ``proj(softmax(q kᵀ/√d) v)``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, W // self.heads)  # B, N, 3, n, d
        qkv = qkv.permute(2, 0, 3, 1, 4)  # 3, B, n, N, d
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # B, n, N, d
        return self.proj(out.transpose(1, 2).reshape(B, N, W))  # B, N, W


class SideMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SideBlock(nn.Module):
    """A pre-norm ViT block (timm ``Block``: LN eps 1e-6, exact GELU)."""

    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = SideAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = SideMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Mlp(nn.Module):
    """``san/model/layers.py`` ``MLP``: affine layers with ReLU between (``dense`` = 1×1 convs)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, dense: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        make = (lambda i, o: nn.Conv2d(i, o, kernel_size=1)) if dense else nn.Linear
        self.layers = nn.ModuleList(make(i, o) for i, o in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class Fusion(nn.Module):
    """``AddFusion``'s projection: ``Conv1×1(LN2d(F_j))`` (CLIP width → side width)."""

    def __init__(self, clip_width: int, side_width: int, eps: float):
        super().__init__()
        self.norm = LayerNorm2d(clip_width, eps)
        self.proj = nn.Conv2d(clip_width, side_width, kernel_size=1)
        nn.init.kaiming_uniform_(self.proj.weight, a=1)  # detectron2 c2_xavier_fill
        nn.init.zeros_(self.proj.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(feature))


class MaskDecoder(nn.Module):
    """``MLPMaskDecoder`` (one bias set shared by all recognition blocks, ``NUM_LAYERS = 1``)."""

    def __init__(
        self, width: int, hidden: int, channels: int, num_layers: int, clip_heads: int, rescale: bool
    ):
        super().__init__()
        self.clip_heads = clip_heads
        self.query_mlp = Mlp(width, hidden, channels, num_layers)
        self.pix_mlp = Mlp(width, hidden, channels, num_layers, dense=True)
        self.attn_mlp = Mlp(width, hidden, channels * clip_heads, num_layers, dense=True)
        self.bias_scaling = nn.Linear(1, 1) if rescale else nn.Identity()

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [B, Q, w]``, ``x [B, w, h, w']`` → masks ``[B, Q, h, w']`` and attention biases
        ``[B, heads, Q, h, w']``."""
        q = self.query_mlp(query)  # B, Q, E
        pix = self.pix_mlp(x)  # B, E, h, w
        B, E, h, w = pix.shape
        masks = torch.einsum("bqc,bchw->bqhw", q, pix)
        attn = self.attn_mlp(x).reshape(B, self.clip_heads, E, h, w)  # B, n, E, h, w
        bias = torch.einsum("bqc,bnchw->bnqhw", q, attn)  # B, n, Q, h, w
        bias = self.bias_scaling(bias[..., None]).squeeze(-1)  # a·x + b
        return masks, bias


def build_attn_mask(
    bias: torch.Tensor, grid: tuple[int, int], clip_heads: int, value: float = -100.0
) -> torch.Tensor:
    """The recognition blocks' additive mask, ``_build_attn_biases`` of the official
    ``RecWithAttnbiasHead`` (``cross_attn = False``, ``downsample_method = "max"``).

    Args:
        bias: ``[B, n, Q, h_s, w_s]`` (``n`` = CLIP heads or 1) at the side grid.
        grid: the CLIP grid ``(h, w)``; the bias is adaptive-max-pooled to it.
    Returns:
        ``[B·heads, N, N]`` for tokens ``[SOS₁…SOS_Q, cls, patches]``, ``N = Q + 1 + h·w``.
    """
    B, n, Q, _, _ = bias.shape
    if n not in (1, clip_heads):
        raise ValueError(f"the bias has {n} heads; the CLIP blocks have {clip_heads}")
    h, w = grid
    pooled = F.adaptive_max_pool2d(bias.reshape(B, n * Q, *bias.shape[-2:]), (h, w))  # B, nQ, h, w
    pooled = pooled.reshape(B, n, Q, h * w).expand(B, clip_heads, Q, h * w)  # B, heads, Q, hw
    N = Q + 1 + h * w
    base = bias.new_zeros(N, N)
    base[:, :Q] = value  # nobody attends to the [SOS] tokens …
    base[torch.arange(Q), torch.arange(Q)] = 0  # … but each to itself
    base[:Q, Q] = value  # [SOS] → cls
    mask = base.expand(B, clip_heads, N, N).clone()  # B, heads, N, N
    mask[:, :, :Q, Q + 1:] = pooled
    return mask.reshape(B * clip_heads, N, N)


# --------------------------------------------------------------------------------------------
# The head


class SanHead(nn.Module):
    """Everything SAN trains: side ViT + queries, fusion layers, MLP mask decoder, attention-bias
    rescale (``a·x + b``), the CLIP visual position embedding copy, the void embedding. NOT the
    backbone: it is passed to ``forward`` and never registered.

    Parameter names follow timm (side ViT) and the official ``MLPMaskDecoder``; the converter
    ``tools/model_converters/san2ovdense.py`` maps both published layouts onto them.
    """

    def __init__(self, backbone: ClipBackbone, config: SanConfig | None = None):
        super().__init__()
        cfg = (config or SanConfig()).resolve(backbone)
        self.config = cfg
        visual = backbone.model.visual
        self.clip_heads = int(visual.transformer.resblocks[0].attn.num_heads)
        self.clip_depth = backbone.num_layers
        width = cfg.side_width
        grid = cfg.side_image_size // cfg.side_patch
        self.side_grid = (grid, grid)
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.side_patch, stride=cfg.side_patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        self.query_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, width))
        self.query_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, width))
        self.blocks = nn.ModuleList(
            SideBlock(width, cfg.side_heads, cfg.side_mlp, cfg.side_eps) for _ in range(cfg.side_depth)
        )
        self.fusions = nn.ModuleList(Fusion(backbone.width, width, cfg.side_eps) for _ in cfg.side_targets)
        self.decoder = MaskDecoder(width, cfg.decoder_hidden, cfg.decoder_channels, cfg.decoder_layers,
                                   self.clip_heads, cfg.rescale_attn_bias)
        self.clip_pos_embed = nn.Parameter(visual.positional_embedding.detach().clone().float())
        self.void_embed = nn.Parameter(torch.randn(1, backbone.embed_dim) * backbone.embed_dim ** -0.5)
        self._init_side()

    def _init_side(self) -> None:
        """timm's ViT init for the side network and the official query init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.query_embed, std=0.02)
        nn.init.normal_(self.query_pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------

    def forward(
        self,
        backbone: ClipBackbone,
        images: torch.Tensor,
        text: torch.Tensor,
        all_layers: bool | None = None,
    ) -> list[SanOutput]:
        """Decode the supervised side layers.

        Args:
            backbone: the frozen backbone this head belongs to.
            images: normalised ``[B, 3, H, W]``, ``H`` and ``W`` multiples of ``side_patch``
                (``size_divisor`` for the CLIP input to be patch-aligned).
            text: ``[C, D]`` L2-normalised class embeddings (``backbone.encode_text``).
            all_layers: decode every supervised side layer (training) or only the last;
                ``None`` = ``self.training``.
        Returns:
            one ``SanOutput`` per decoded layer, deepest last.
        """
        cfg = self.config
        p = cfg.side_patch
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the side patch {p}")
        all_layers = self.training if all_layers is None else all_layers
        visual = backbone.model.visual
        x, features, grid = self.trunk(backbone, images)
        wanted = cfg.supervised if all_layers else cfg.supervised[-1:]
        outputs = []
        classes = F.normalize(torch.cat([text.float(), self.void_embed.float()]), dim=-1)  # C+1, D
        scale = backbone.model.logit_scale.exp().float()
        for query, patches in self.side(images, features, wanted):
            masks, bias = self.decoder(query, patches)
            embeddings = self.recognize(visual, x, bias, grid)  # B, Q, D
            logits = scale * torch.einsum("bqd,cd->bqc", embeddings, classes)  # B, Q, C+1
            outputs.append(SanOutput(masks, logits))
        return outputs

    def trunk(self, backbone: ClipBackbone, images: torch.Tensor):
        """CLIP's first ``trunk_depth`` blocks on the scaled image: the tokens after them
        ``[B, 1 + h·w, W]``, the tapped maps ``[B, W, h, w]`` in ``clip_taps`` order, and ``(h, w)``."""
        cfg = self.config
        visual = backbone.model.visual
        clip_in = F.interpolate(images, scale_factor=cfg.clip_scale, mode="bilinear", align_corners=False)
        pp = backbone.patch_size
        h, w = clip_in.shape[-2] // pp, clip_in.shape[-1] // pp
        clip_in = clip_in[..., : h * pp, : w * pp]  # B, 3, h·p, w·p (conv1 drops the rest too)
        x = embed(visual, clip_in, pos_embed=self.clip_pos_embed, resize="size")  # B, 1+hw, W
        first = x
        x, taps = run_blocks(visual, x, 0, cfg.trunk_depth, taps=[t - 1 for t in cfg.clip_taps if t > 0])
        B = x.shape[0]
        features = []
        for t in cfg.clip_taps:
            tokens = first if t == 0 else taps[t - 1]
            features.append(tokens[:, 1:].transpose(1, 2).reshape(B, -1, h, w))  # B, W, h, w
        return x, features, (h, w)

    def side(self, images: torch.Tensor, features: Sequence[torch.Tensor], wanted: Sequence[int]):
        """The side ViT with fusion: ``(queries [B, Q, w], patches [B, w, h_s, w_s])`` after each
        side block in ``wanted`` (``forward_features`` of ``RegionwiseSideAdapterNetwork``)."""
        cfg = self.config
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(images.to(dtype))  # B, w, h_s, w_s
        B, width, hs, ws = x.shape
        L = hs * ws
        x = x.flatten(2).transpose(1, 2)  # B, L, w
        pos = self.pos_embed
        if (hs, ws) != self.side_grid:
            grid = pos.reshape(1, *self.side_grid, width).permute(0, 3, 1, 2)  # 1, w, g, g
            grid = F.interpolate(grid, size=(hs, ws), mode="bicubic", align_corners=False)
            pos = grid.flatten(2).transpose(1, 2)  # 1, L, w
        pos = torch.cat([self.query_pos_embed, pos], dim=1)  # 1, Q+L, w
        x = torch.cat([self.query_embed.expand(B, -1, -1), x], dim=1) + pos  # B, Q+L, w
        target_of = {t: k for k, t in enumerate(cfg.side_targets)}

        def fuse(layer: int, x: torch.Tensor) -> torch.Tensor:
            k = target_of.get(layer)
            if k is None:
                return x
            y = self.fusions[k](features[k].to(dtype))  # B, w, h, w
            y = F.interpolate(y, size=(hs, ws), mode="bilinear", align_corners=False)
            y = y.flatten(2).transpose(1, 2)  # B, L, w
            return torch.cat([x[:, :-L], x[:, -L:] + y], dim=1)

        x = fuse(0, x)
        outs = []
        for index, block in enumerate(self.blocks, start=1):
            x = fuse(index, block(x))
            if index in wanted:
                patches = x[:, -L:].transpose(1, 2).reshape(B, width, hs, ws)  # B, w, h_s, w_s
                outs.append((x[:, :-L], patches))
            if index < len(self.blocks):
                x = x + pos
        return outs

    def recognize(
        self, visual: nn.Module, x: torch.Tensor, bias: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """[SOS] tokens through CLIP's last blocks under the biased mask: ``[B, Q, D]``, L2-normalised."""
        Q = self.config.num_queries
        B, _, W = x.shape
        mask = build_attn_mask(bias, grid, self.clip_heads, self.config.mask_value)  # B·heads, N, N
        z = torch.cat([x[:, :1].expand(B, Q, W), x], dim=1)  # B, Q+1+hw, W
        z, _ = run_blocks(visual, z, self.config.trunk_depth, self.clip_depth, attn_mask=mask.to(z.dtype))
        sos = visual.ln_post(z[:, :Q]) @ visual.proj  # B, Q, D
        return F.normalize(sos.float(), dim=-1)


def semantic_scores(output: SanOutput, size: tuple[int, int]) -> torch.Tensor:
    """``S[B, C, H, W] = Σ_q softmax(class_logits)[..., :C] · sigmoid(masks)``, masks upsampled
    bilinearly to ``size`` first (``semantic_inference`` of the official ``san.py``)."""
    masks = F.interpolate(output.mask_logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    probs = torch.softmax(output.class_logits.float(), dim=-1)[..., :-1]  # B, Q, C
    return torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_head(path: str | Path, head: SanHead, backbone: ClipBackbone,
              dtype: torch.dtype | None = None) -> Path:
    """Write the head as safetensors (atomically) with string metadata: format, backbone name,
    its identity (``ClipBackbone.identity``), the SanConfig as JSON and the ovdense version.
    ``dtype`` (e.g. ``torch.float16``, half the file) stores the floating tensors in that type;
    ``load_head`` casts them back to the head's own."""
    from safetensors.torch import save

    from ovdense.version import __version__

    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "format": HEAD_FORMAT,
        "backbone": backbone.name,
        "fingerprint": backbone.identity,
        "config": head.config.to_json(),
        "ovdense_version": __version__,
    }
    return write_bytes(path, save(tensors, metadata=metadata))


def load_head(path: str | Path, backbone: ClipBackbone) -> SanHead:
    """Read a head written by ``save_head`` for this backbone (never unpickles anything).

    Raises:
        OvdenseError: not a safetensors SAN head, another backbone, missing/unexpected keys or
            a tensor of the wrong shape; each message says which and what to do.
    """
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise OvdenseError(f"SAN head checkpoint not found: {file}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - anything unreadable is the user's wrong file
        raise OvdenseError(
            f"{file} is not a safetensors SAN head (a pickled .pth or another file?); ovdense never "
            "unpickles head checkpoints: convert published SAN weights with "
            "tools/model_converters/san2ovdense.py"
        ) from e
    if metadata.get("format") != HEAD_FORMAT:
        raise OvdenseError(f"{file} is a safetensors file but not a SAN head (format "
                           f"{metadata.get('format')!r}); write heads with ovdense.heads.san.save_head")
    identity = backbone.identity
    if metadata.get("backbone") != backbone.name or metadata.get("fingerprint") != identity:
        raise OvdenseError(
            f"{file} was trained on backbone {metadata.get('backbone')!r} ({metadata.get('fingerprint')}), "
            f"not on this one, {backbone.name!r} ({identity}); create that backbone or use a head "
            "trained on this one"
        )
    head = SanHead(backbone, SanConfig.from_json(metadata.get("config", "{}")))
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OvdenseError(f"{file} does not fit SanHead: missing keys {missing[:5]}, unexpected keys "
                           f"{unexpected[:5]}; was it written by another ovdense version?")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise OvdenseError(f"{file} does not fit SanHead: {key} has shape {tuple(tensor.shape)}, the "
                               f"head expects {tuple(expected[key].shape)}")
    head.load_state_dict(state, strict=True)
    return head.to(backbone.device)


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
        return SegmentationResult(labels.cpu().numpy(), share.float().cpu().numpy(), self.classes)


def head_parameters(head: SanHead) -> int:
    """The number of trained parameters."""
    return sum(p.numel() for p in head.parameters())
