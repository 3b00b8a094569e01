"""Training-free dense features: CLIP's vision transformer with its last block replaced.

All blocks but the last run unchanged; the last block is one of the variants below; then the
final layer norm ``ln_post`` and the projection ``proj`` map every token into the joint
image–text space. Notation (per head, ``s = head_dim ** -0.5``)::

    y = ln_1(x)                       x: [B, N, W] tokens entering the last block (N = 1 + h·w)
    q, k, v = split(y @ W_inᵀ + b_in)  each [B, heads, N, head_dim]
    attend(A) = out_proj(merge_heads(A @ v))

The variants follow each method's official code; where the code and the paper differ, the
code is followed and the docstring says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.protocols import METHOD_INFO, Protocol
from ovdense.errors import OvdenseError

# --------------------------------------------------------------------------------------------
# Support check and token embedding


def check_supported(visual: nn.Module, name: str) -> None:
    """Raise ``OvdenseError`` unless ``visual`` is an open_clip ViT with plain attention blocks."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise OvdenseError(
            f"model {name!r} is not supported: ovdense needs an open_clip VisionTransformer "
            f"(ViT-B-16, ViT-L-14, …), this one's image tower is {type(visual).__name__}"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise OvdenseError(
            f"model {name!r} is not supported: its ViT pools with "
            f"{'an attention pooler' if visual.attn_pool is not None else visual.pool_type!r}, "
            "ovdense needs a class-token ViT"
        )
    for block in visual.transformer.resblocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise OvdenseError(
                f"model {name!r} is not supported: its blocks are {type(block).__name__}, "
                "ovdense needs open_clip's ResidualAttentionBlock with nn.MultiheadAttention"
            )


def interpolate_pos_embed(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``[1 + g_h·g_w, W]`` → ``[1 + h·w, W]`` for a ``h × w`` patch grid.

    Identity at the native grid. Otherwise bicubic with ``scale_factor = (n + 0.1) / g`` per
    axis (the DINO rule the official SCLIP/ClearCLIP/NACLIP code uses, the 0.1 guarding against
    floating-point truncation of the output size).
    """
    if tuple(grid) == tuple(native):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    g_h, g_w = native
    h, w = grid
    patch_pos = patch_pos.reshape(1, g_h, g_w, -1).permute(0, 3, 1, 2)  # 1, W, g_h, g_w
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((h + 0.1) / g_h, (w + 0.1) / g_w),
        mode="bicubic",
        align_corners=False,
    ).to(pos.dtype)
    assert patch_pos.shape[-2:] == (h, w), patch_pos.shape
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1)  # hw, W
    return torch.cat([cls_pos, patch_pos], dim=0)


def embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch + class + (interpolated) position embeddings, then ``ln_pre``: ``[B, 1 + h·w, W]``."""
    p_h, p_w = visual.patch_size
    H, W = images.shape[-2:]
    if H % p_h or W % p_w:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p_h}x{p_w}")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # B, W, h, w
    B, width, h, w = x.shape
    x = x.reshape(B, width, h * w).permute(0, 2, 1)  # B, hw, W
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)  # B, 1+hw, W
    x = x + interpolate_pos_embed(visual.positional_embedding, visual.grid_size, (h, w)).to(x.dtype)
    return visual.ln_pre(x)


# --------------------------------------------------------------------------------------------
# Attention pieces shared by the variants


def qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ln_1`` then the input projection: ``q, k, v`` each ``[B, heads, N, head_dim]``."""
    attn: nn.MultiheadAttention = block.attn
    y = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # B, N, 3W
    B, N, _ = y.shape
    y = y.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3, B, heads, N, hd
    return y[0], y[1], y[2]


def attend(block: nn.Module, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out_proj(merge_heads(weights @ v))``: weights ``[B, heads, N, N]`` → ``[B, N, W]``."""
    out = weights @ v  # B, heads, N, hd
    B, heads, N, hd = out.shape
    out = out.transpose(1, 2).reshape(B, N, heads * hd)  # B, N, W
    return block.attn.out_proj(out)


def self_softmax(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``softmax(a · bᵀ · s)`` over the last axis, ``s = head_dim ** -0.5``: ``[B, heads, N, N]``."""
    scale = a.shape[-1] ** -0.5
    return torch.softmax((a @ b.transpose(-2, -1)) * scale, dim=-1)


def residual_ffn(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The block's own residual and feed-forward around a replaced attention output."""
    x = x + block.ls_1(attn_out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# --------------------------------------------------------------------------------------------
# One unchanged block, through scaled_dot_product_attention


def _plain_block(block: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` (pre-norm, ``nn.MultiheadAttention`` batch first with
    packed in-projection, no key/value biases or zero attention, no cross attention, no extra norm
    inside the attention): what ``run_block`` reproduces. Anything else runs as it is."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None and attn.bias_k is None and not attn.add_zero_attn
            and all(hasattr(block, name) for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
            and not hasattr(block, "ln_1_kv") and not hasattr(block, "ln_attn")
            and (attn.dropout == 0.0 or not attn.training))


def run_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``block(x, attn_mask=attn_mask)`` for an unchanged open_clip block on batch-first tokens
    ``x [B, N, W]``, with the attention through ``F.scaled_dot_product_attention`` instead of
    ``nn.MultiheadAttention``: the same function (``ln_1`` → packed q/k/v projection → softmax
    attention with ``head_dim ** -0.5`` → ``out_proj`` → residual with ``ls_1``; ``ln_2`` → MLP →
    residual with ``ls_2``), equal to float32 rounding (``tests/test_runner.py``). On CPU, torch's
    fused path of ``nn.MultiheadAttention`` (``_native_multi_head_attention``) takes as long as the
    block's MLP although it has fewer FLOPs; SDPA runs the same attention in less
    (``tools/benchmarks/attention.py`` measures it per block). Gradients flow as through the block.

    ``attn_mask``: additive float ``[N, N]`` or ``[B·heads, N, N]`` (``nn.MultiheadAttention``'s
    layouts). A block of another kind runs as it is (``block(x, attn_mask=...)``)."""
    if not _plain_block(block):
        return block(x, attn_mask=attn_mask) if attn_mask is not None else block(x)
    B, N, W = x.shape
    q, k, v = qkv(block, x)  # B, heads, N, hd
    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(q.dtype)
        mask = mask.view(B, q.shape[1], N, N) if mask.dim() == 3 else mask  # [N, N] broadcasts
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # B, heads, N, hd
    return residual_ffn(block, x, block.attn.out_proj(out.transpose(1, 2).reshape(B, N, W)))


# --------------------------------------------------------------------------------------------
# The last-block variants (one function each)


def vanilla_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CLIP's own last block, unchanged (the baseline; Radford et al. 2021)."""
    return run_block(block, x)


def sclip_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """SCLIP — Wang et al., "SCLIP: Rethinking Self-Attention for Dense Vision-Language
    Inference", ECCV 2024, Eq. 5 (correlative self-attention), as in wangf3014/SCLIP
    ``clip/model.py`` ``custom_attn``:

        A = softmax(q qᵀ s) + softmax(k kᵀ s);   x ← x + attend(A);   x ← x + mlp(ln_2(x))

    The paper writes one shared projection W_r; the official code uses CLIP's own ``W_q`` and
    ``W_k`` and sums two softmaxes, which is what is done here. Residual and FFN are kept.
    """
    q, k, v = qkv(block, x)
    weights = self_softmax(q, q) + self_softmax(k, k)  # B, heads, N, N
    return residual_ffn(block, x, attend(block, weights, v))


def clearclip_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ClearCLIP — Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense
    Vision-Language Inference", ECCV 2024, §4 (Eq. 7), as in mc-lan/ClearCLIP
    ``open_clip/transformer.py``: query–query attention, residual connection and FFN removed:

        x ← attend(softmax(q qᵀ s))
    """
    q, _, v = qkv(block, x)
    return attend(block, self_softmax(q, q), v)


def gaussian_neighbourhood(grid: tuple[int, int], std: float, device=None) -> torch.Tensor:
    """NACLIP's Ω: ``[1 + h·w, 1 + h·w]``, ``exp(-‖p_i − p_j‖² / (2 std²))`` over patch-grid
    positions, zero in the class token's row and column."""
    h, w = grid
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)  # hw, 2
    omega = torch.exp(-torch.cdist(pos, pos).pow(2) / (2.0 * std**2))  # hw, hw
    return F.pad(omega, (1, 0, 1, 0))  # 1+hw, 1+hw


def naclip_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int], std: float = 5.0) -> torch.Tensor:
    """NACLIP — Hajimiri et al., "Pay Attention to Your Neighbours: Training-Free
    Open-Vocabulary Semantic Segmentation", WACV 2025, Eq. 4–6, as in sinahmr/NACLIP
    ``clip/model.py`` (``arch='reduced'``, ``attn_strategy='naclip'``, ``gaussian_std=5``):

        x ← attend(softmax(k kᵀ s + Ω))

    Ω is the Gaussian of the patch-grid distance (σ = ``std``; zero for pairs with the class
    token). Residual connection and FFN are removed ("reduced" architecture).
    """
    _, k, v = qkv(block, x)
    scale = k.shape[-1] ** -0.5
    omega = gaussian_neighbourhood(grid, std, device=k.device).to(k.dtype)  # N, N
    weights = torch.softmax((k @ k.transpose(-2, -1)) * scale + omega, dim=-1)  # B, heads, N, N
    return attend(block, weights, v)


def maskclip_block(
    block: nn.Module, x: torch.Tensor, grid: tuple[int, int], keep_residual: bool = True
) -> torch.Tensor:
    """MaskCLIP — Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022, §3.2: the
    last attention is replaced by the value path, each token attending only to itself. As in
    chongzhou96/MaskCLIP ``mmseg/models/backbones/vit.py`` (``return_qkv`` path), the block's
    residual and FFN are kept:

        v ← out_proj(W_v ln_1(x) + b_v) + x;   v ← v + mlp(ln_2(v))

    ``keep_residual=False`` gives ClearCLIP's ablation (``x ← out_proj(W_v ln_1(x) + b_v)``).
    """
    _, _, v = qkv(block, x)
    B, heads, N, hd = v.shape
    out = block.attn.out_proj(v.transpose(1, 2).reshape(B, N, heads * hd))  # B, N, W
    return residual_ffn(block, x, out) if keep_residual else out


def cliptrase_block(block: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CLIPtrase — Shao et al., "Explore the Potential of CLIP for Training-Free Open
    Vocabulary Semantic Segmentation", ECCV 2024, §3.2 (semantic-correlation recovery), as in
    leaves162/CLIPtrase ``clip_utils/attn2.py`` (``self_qk_weight`` in block 12):

        A = softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s);   x ← x + attend(A);
        x ← x + mlp(ln_2(x))

    Residual and FFN are kept. The clustering post-step is ``cliptrase_affinity`` + the
    Segmenter's ``cluster`` option. The official evaluation resizes the short side to 224 and
    centre-crops a square; ovdense keeps the whole image (short side 224, one pass).
    """
    q, k, v = qkv(block, x)
    weights = self_softmax(q, q) + self_softmax(k, k) + self_softmax(v, v)  # B, heads, N, N
    return residual_ffn(block, x, attend(block, weights, v))


def cliptrase_affinity(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIPtrase's patch affinity from a block's input (``self_out_weight`` in attn2.py): the
    head mean of ``(cos(q_i, q_j) + cos(k_i, k_j) + cos(v_i, v_j)) / 3``: ``[B, N, N]``."""
    q, k, v = qkv(block, x)
    total = 0.0
    for t in (q, k, v):
        t = F.normalize(t, dim=-1)
        total = total + t @ t.transpose(-2, -1)  # B, heads, N, N
    return (total / 3.0).mean(dim=1)


def itaclip_block(
    block: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    intermediate_maps: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """ITACLIP — Aydın et al., "ITACLIP: Boosting Training-Free Semantic Segmentation with
    Image, Text, and Architectural Enhancements", CVPRW 2025, §3.1, as in m-arda-aydn/ITACLIP
    ``clip/model.py`` (``attn_self=True``):

        A_l = softmax(q qᵀ s) + softmax(k kᵀ s) in block l;
        A = 0.5 · A_last + 0.5 · mean(A_7, A_8, A_10)   (blocks 1-indexed);
        x ← x + attend(A)                                (residual kept, FFN removed)

    ``intermediate_maps`` are the ``A_l`` of the chosen earlier blocks (``encode_tokens``
    computes them from each block's own input).
    """
    q, k, v = qkv(block, x)
    weights = self_softmax(q, q) + self_softmax(k, k)  # B, heads, N, N
    if intermediate_maps:
        weights = 0.5 * weights + 0.5 * torch.stack(list(intermediate_maps)).mean(dim=0)
    return x + attend(block, weights, v)


@dataclass(frozen=True)
class OwnGrid:
    """What a last block returns when its tokens lie on a grid of their own rather than CLIP's
    patch grid (ProxyCLIP: the VFM's): patch tokens only, ``[B, h·w, W]``, and ``(h, w)``."""

    tokens: torch.Tensor
    grid: tuple[int, int]


def proxy_attention(features: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's proxy attention (Lan et al., ECCV 2024, Eq. 3–5) from VFM features
    ``[B, C, h, w]``: ``[B, h·w, h·w]``, one map shared by all heads.

    As in mc-lan/ProxyCLIP ``open_clip/transformer.py`` ``custom_attn``: cosine similarity of the
    L2-normalised features, ``S' = (S − β·mean(S))·γ`` with one scalar mean per image, entries
    below 0 set to −∞, softmax over each row.

    Departures: the official mean is over the whole batch it is given; its segmentor gives one
    window at a time, so the mean here is per image, which equals it for any batch of windows. Each
    patch's own similarity is 1, so when a window's mean similarity exceeds 1/β (0.83: features
    almost all alike) every entry falls below 0; the official map is then all −∞ and the window's
    output NaN. Here each patch then attends to its most similar patches (itself and exact copies).
    """
    f = F.normalize(features.flatten(2).float(), dim=1)  # B, C, hw
    similarity = f.transpose(1, 2) @ f  # B, hw, hw
    mean = similarity.mean(dim=(1, 2), keepdim=True)  # B, 1, 1
    similarity = (similarity - mean * beta) * gamma
    dropped = similarity < 0.0
    empty = dropped.all(dim=-1, keepdim=True)  # rows the official code would turn to NaN
    if bool(empty.any()):
        dropped = dropped & ~(empty & (similarity == similarity.amax(dim=-1, keepdim=True)))
    similarity = similarity.masked_fill(dropped, float("-inf"))
    return torch.softmax(similarity, dim=-1)


def proxyclip_block(
    block: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    vfm_features: torch.Tensor | None = None,
    beta: float = 1.2,
    gamma: float = 3.0,
) -> OwnGrid:
    """ProxyCLIP — Lan et al., "ProxyCLIP: Proxy Attention Improves CLIP for Open-Vocabulary
    Segmentation", ECCV 2024, §3.2, as in mc-lan/ProxyCLIP ``open_clip/transformer.py``
    (``VisionTransformer.forward`` with ``ex_feats``, ``custom_attn``):

        v = W_v ln_1(x) + b_v        (patch tokens only, per head, on CLIP's grid)
        v' = bilinear(v → the VFM's grid h' × w')
        x ← out_proj(merge_heads(proxy_attention(F_vfm) @ v'))     on the VFM's grid

    No residual, no FFN, no class token; ``ln_post`` and ``proj`` follow (``encode_patches``).
    ``vfm_features`` ``[B, C, h', w']`` are the VFM's features of the same window (the
    ``Segmenter`` computes them); ``beta``, ``gamma``: the official 1.2 and 3.

    Departure: for a window that is not square, the official code reshapes the values with height
    and width swapped (``B, nc, w, h = x.shape``) and its DINO branch reshapes with the height
    twice, so it fails or scrambles the values; its protocol (short side ≥ crop) only makes square
    windows. Here both axes keep their own sizes.
    """
    if vfm_features is None:
        raise OvdenseError("proxyclip needs the VFM's features of the window (vfm_features=...); "
                           "Segmenter(..., vfm=create_vfm(...)) computes them")
    if vfm_features.shape[0] != x.shape[0]:
        raise OvdenseError(f"proxyclip: {vfm_features.shape[0]} VFM feature maps for {x.shape[0]} images")
    _, _, v = qkv(block, x)  # B, heads, N, hd
    B, heads, N, hd = v.shape
    h, w = grid
    out_h, out_w = vfm_features.shape[-2:]
    v = v[:, :, 1:].reshape(B * heads, h, w, hd).permute(0, 3, 1, 2)  # B·heads, hd, h, w
    v = F.interpolate(v, size=(out_h, out_w), mode="bilinear", align_corners=False)
    v = v.reshape(B, heads, hd, out_h * out_w).transpose(-2, -1)  # B, heads, h'w', hd
    weights = proxy_attention(vfm_features, beta, gamma).to(v.dtype).unsqueeze(1)  # B, 1, h'w', h'w'
    return OwnGrid(attend(block, weights, v), (out_h, out_w))


def self_self_map(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q qᵀ s) + softmax(k kᵀ s)`` of a block from its input: ``[B, heads, N, N]``."""
    q, k, _ = qkv(block, x)
    return self_softmax(q, q) + self_softmax(k, k)


# --------------------------------------------------------------------------------------------
# The registry of methods and their official inference defaults


@dataclass(frozen=True)
class MethodSpec:
    """A training-free method: its last-block function, the paper, and official defaults
    (``protocols.METHOD_INFO``, the torch-free table ``ovdense methods`` prints).

    ``capture`` lists earlier blocks (0-indexed) whose self-self attention maps the last block
    needs (ITACLIP); ``change`` says in a few words what happens in the last block.
    """

    block: Callable[..., torch.Tensor]
    paper: str
    change: str
    protocol: Protocol = field(default_factory=Protocol)
    capture: tuple[int, ...] = ()
    needs: tuple[str, ...] = ()


_BLOCKS: dict[str, Callable[..., torch.Tensor]] = {
    "vanilla": vanilla_block,
    "maskclip": maskclip_block,
    "sclip": sclip_block,
    "clearclip": clearclip_block,
    "naclip": naclip_block,
    "cliptrase": cliptrase_block,
    "itaclip": itaclip_block,
    "proxyclip": proxyclip_block,
}

METHODS: dict[str, MethodSpec] = {
    name: MethodSpec(_BLOCKS[name], info.paper, info.change, info.protocol, info.capture, info.needs)
    for name, info in METHOD_INFO.items()
}


def _last_block_output(visual: nn.Module, images: torch.Tensor, method: str, **options):
    """Every block but the last unchanged, then the method's last block: ``[B, 1 + h·w, W]``, or an
    ``OwnGrid`` for a method whose tokens lie on a grid of their own."""
    if method not in METHODS:
        raise OvdenseError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
    spec = METHODS[method]
    blocks = visual.transformer.resblocks
    if any(i >= len(blocks) - 1 for i in spec.capture):
        raise OvdenseError(
            f"{method} uses blocks {[i + 1 for i in spec.capture]} (1-indexed) before the last, "
            f"but this model has {len(blocks)} blocks"
        )
    grid = (images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1])
    x = embed(visual, images)  # B, 1+hw, W
    maps = []
    for index, block in enumerate(blocks[:-1]):
        if index in spec.capture:
            maps.append(self_self_map(block, x))
        x = run_block(block, x)
    if spec.capture:
        options = {**options, "intermediate_maps": maps}
    return spec.block(blocks[-1], x, grid, **options)


def encode_tokens(visual: nn.Module, images: torch.Tensor, method: str, **options) -> torch.Tensor:
    """All tokens of the last layer in the joint space: ``[B, 1 + h·w, D]`` (not normalised).

    Runs every block but the last unchanged (``run_block``), the method's last block, then
    ``ln_post`` and ``proj``. For ITACLIP, the self-self maps of ``spec.capture`` are taken on the way.
    A method whose last block leaves CLIP's grid (ProxyCLIP) has no class token: use ``encode_patches``.
    """
    x = _last_block_output(visual, images, method, **options)
    if isinstance(x, OwnGrid):
        raise OvdenseError(f"{method} keeps no class token; its patch tokens come from encode_patches")
    return visual.ln_post(x) @ visual.proj  # B, 1+hw, D


def encode_patches(visual: nn.Module, images: torch.Tensor, method: str, **options) -> torch.Tensor:
    """The patch tokens of the last layer in the joint space on their grid: ``[B, D, h, w]`` (not
    normalised): CLIP's patch grid, or the grid the method's last block returns (``OwnGrid``)."""
    x = _last_block_output(visual, images, method, **options)
    if isinstance(x, OwnGrid):
        tokens, (h, w) = x.tokens, x.grid
    else:
        tokens = x[:, 1:]
        h, w = images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1]
    tokens = visual.ln_post(tokens) @ visual.proj  # B, hw, D
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)  # B, D, h, w


def block_input_affinity(visual: nn.Module, images: torch.Tensor, block_index: int) -> torch.Tensor:
    """CLIPtrase's affinity (``cliptrase_affinity``) at the input of block ``block_index``
    (0-indexed; the official code uses block 11 of 12, index ``-2``): ``[B, N, N]``."""
    blocks = visual.transformer.resblocks
    block_index = block_index % len(blocks)
    x = embed(visual, images)
    for block in blocks[:block_index]:
        x = run_block(block, x)
    return cliptrase_affinity(blocks[block_index], x)


def intermediate_maps(visual: nn.Module, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
    """Token maps after the given blocks (0-indexed): each ``[B, W, h, w]`` (class token dropped)."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return []
    blocks = visual.transformer.resblocks
    if wanted[0] < 0 or wanted[-1] >= len(blocks):
        raise OvdenseError(f"block indices must lie in [0, {len(blocks) - 1}], got {list(indices)}")
    h, w = images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1]
    x = embed(visual, images)
    out = {}
    for index, block in enumerate(blocks[: wanted[-1] + 1]):
        x = run_block(block, x)
        if index in wanted:
            out[index] = x[:, 1:].reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # B, W, h, w
    return [out[int(i)] for i in indices]
