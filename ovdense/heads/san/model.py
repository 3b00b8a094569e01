"""SAN's network: its configuration, the side adapter (ViT, fusion, mask decoder), the
recognition pass on the frozen CLIP's last blocks, and the semantic scores. The package's doc
(``ovdense/heads/san/__init__.py``) gives the equations; ``segmenter.py`` reads checkpoints and
segments images with a head.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.clip import ClipBackbone
from ovdense.backbone.runner import embed, run_blocks
from ovdense.errors import OvdenseError

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
