"""The one way a trained head runs the frozen CLIP vision tower: ``embed`` then ``run_blocks``.

The training-free methods change only the last block (``ovdense.backbone.dense``); trained
heads need more of the tower. SAN runs the first blocks with taps (its trunk), then the last
blocks again on extra tokens under an attention mask (its recognition path); F-ViT taps a few
blocks. Each head calls these two functions instead of writing its own loop over
``visual.transformer.resblocks``::

    x = embed(visual, images)                                   # B, 1 + h·w, W (after ln_pre)
    x, taps = run_blocks(visual, x, 0, 9, taps=(2, 5, 8))       # blocks 0..8, tokens after 2, 5, 8
    y, _ = run_blocks(visual, z, 9, 12, attn_mask=bias)         # blocks 9..11 under a mask
    x, taps = run_blocks(visual, x, 0, 11, taps=((8, "ln_2"), (3, "attn")))  # named captures

A tap is a block index (the tokens after that block) or ``(index, kind)``, ``kind`` one of
``TAP_KINDS``: the block's ``"input"``, its ``"ln_1"`` output, its ``"attn"`` probabilities
``softmax(q kᵀ / √d)`` per head, its ``"ln_2"`` output (the FFN's input) or its ``"output"``.
CLIP-DINOiser reads an ``ln_2`` output, CLIPer the ``ln_1`` outputs and attention maps of the
early blocks; SAN and F-ViT read outputs.

Blocks are 0-indexed; "after ``ln_pre``" is ``embed``'s output. Nothing here holds state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.dense import attend, interpolate_pos_embed, qkv, run_block

POS_RESIZE = ("dino", "size", "bilinear")
TAP_KINDS = ("input", "ln_1", "attn", "ln_2", "output")


def resize_pos_embed(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int],
                     mode: str = "bicubic") -> torch.Tensor:
    """Position embeddings ``[1 + g_h·g_w, W]`` → ``[1 + h·w, W]`` by bicubic (or ``mode``)
    interpolation to the exact output size (``align_corners=False``), the class token's entry kept.

    This is the rule of the official SAN (``resize_pos_embed2d`` in MendelXu/SAN
    ``san/model/attn_helper.py``) and of mmseg's ``VisionTransformer.resize_pos_embed``; it
    differs from ``dense.interpolate_pos_embed`` (the DINO ``scale_factor`` rule of the
    training-free methods) in how the sampling grid is placed. Identity at the native grid.
    """
    if tuple(grid) == tuple(native):
        return pos
    g_h, g_w = native
    patch = pos[1:].reshape(1, g_h, g_w, -1).permute(0, 3, 1, 2)  # 1, W, g_h, g_w
    patch = F.interpolate(patch.float(), size=tuple(grid), mode=mode, align_corners=False)
    patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # hw, W
    return torch.cat([pos[:1], patch], dim=0)


def embed(
    visual: nn.Module,
    images: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    resize: str = "dino",
    pos_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Patch embedding, class token, position embedding, then ``ln_pre``: ``[B, 1 + h·w, W]``.

    Args:
        visual: an open_clip ``VisionTransformer`` (``dense.check_supported``).
        images: normalised ``[B, 3, H, W]``, ``H`` and ``W`` multiples of the patch size.
        pos_embed: ``[1 + g_h·g_w, W]`` at the model's native grid, for a head that trains its own
            copy (SAN); ``None`` = the model's own ``positional_embedding``.
        resize: how the position embedding reaches the image's grid: ``"dino"``
            (``dense.interpolate_pos_embed``, what ``dense.embed`` does), ``"size"``
            (``resize_pos_embed``, bicubic: the official SAN's, mmseg's and CLIP-DINOiser's rule) or
            ``"bilinear"`` (``resize_pos_embed`` with bilinear interpolation: CLIPer's).
        pos_dtype: round the resized position embedding through this dtype before adding it (CLIPer
            rounds it to fp16 also in fp32 runs); ``None`` keeps it.
    """
    if resize not in POS_RESIZE:
        raise ValueError(f"resize must be one of {POS_RESIZE}, got {resize!r}")
    p_h, p_w = visual.patch_size
    H, W = images.shape[-2:]
    if H % p_h or W % p_w:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p_h}x{p_w}")
    pos = visual.positional_embedding if pos_embed is None else pos_embed
    native = tuple(int(g) for g in visual.grid_size)
    if pos.shape[0] != 1 + native[0] * native[1]:
        raise ValueError(f"pos_embed has {pos.shape[0]} rows, the model's native grid {native} needs "
                         f"{1 + native[0] * native[1]}")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # B, W, h, w
    B, width, h, w = x.shape
    x = x.reshape(B, width, h * w).permute(0, 2, 1)  # B, hw, W
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1)  # B, 1+hw, W
    if resize == "dino":
        pos = interpolate_pos_embed(pos, native, (h, w))
    else:
        pos = resize_pos_embed(pos, native, (h, w), mode="bicubic" if resize == "size" else "bilinear")
    if pos_dtype is not None:
        pos = pos.to(pos_dtype)
    x = x + pos.to(x.dtype)
    return visual.ln_pre(x)


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    start: int,
    stop: int,
    taps: Sequence[int | tuple[int, str]] = (),
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Run blocks ``[start, stop)`` of the tower on tokens ``x [B, N, W]`` (batch first).

    Args:
        taps: what to capture on the way: a block index (0-indexed, in ``[start, stop)``) for the
            tokens after that block, or ``(index, kind)`` for a named capture (``TAP_KINDS``; see the
            module's docstring). Tokens are ``[B, N, W]``, attention ``[B, heads, N, N]``.
        attn_mask: an additive float mask passed to every block's attention:
            ``[N, N]``, ``[1, N, N]``, ``[B, heads, N, N]`` or ``[B·heads, N, N]`` (batch-major,
            the layout of ``nn.MultiheadAttention``); ``None`` for none.
    Returns:
        the tokens after block ``stop - 1`` ``[B, N, W]`` and the captures: ``{i: tokens after block i}``
        for an index tap, ``{(i, kind): tensor}`` for a named one.
    """
    blocks = visual.transformer.resblocks
    if not 0 <= start <= stop <= len(blocks):
        raise ValueError(f"blocks [{start}, {stop}) are outside the tower's {len(blocks)} blocks")
    outputs: set[int] = set()  # index taps: out[i]
    named: dict[int, set[str]] = {}  # named taps: out[(i, kind)]
    for tap in taps:
        index, kind = (int(tap), None) if not isinstance(tap, tuple) else (int(tap[0]), tap[1])
        if kind is not None and kind not in TAP_KINDS:
            raise ValueError(f"tap kind must be one of {TAP_KINDS}, got {kind!r}")
        if not start <= index < stop:
            raise ValueError(f"tap {tap} is outside the blocks run, [{start}, {stop})")
        if kind is None:
            outputs.add(index)
        else:
            named.setdefault(index, set()).add(kind)
    mask = _mha_mask(attn_mask, x.shape[0], blocks[0].attn.num_heads) if stop > start else None
    out: dict = {}
    for index in range(start, stop):
        block = blocks[index]
        inner = named.get(index, set()) - {"output"}
        if inner:
            x = _block_with_captures(block, x, mask, inner, index, out)
        elif getattr(block.attn, "batch_first", True):
            x = run_block(block, x, attn_mask=mask)  # open_clip's block, attention through SDPA
        else:  # an old-style sequence-first tower: N, B, W inside the block
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        if index in outputs:
            out[index] = x
        if "output" in named.get(index, ()):
            out[(index, "output")] = x
    return x, out


def _block_with_captures(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, kinds: set[str],
                         index: int, out: dict) -> torch.Tensor:
    """One plain open_clip block written out (``dense.qkv`` → softmax attention → ``out_proj`` →
    residual; ``ln_2`` → MLP → residual), keeping what ``kinds`` asks for in ``out[(index, kind)]``."""
    if "input" in kinds:
        out[(index, "input")] = x
    if "ln_1" in kinds:
        out[(index, "ln_1")] = block.ln_1(x)
    q, k, v = qkv(block, x)  # B, heads, N, hd
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + (mask.view(x.shape[0], q.shape[1], *mask.shape[-2:]) if mask.dim() == 3 else mask)
    weights = torch.softmax(logits, dim=-1)  # B, heads, N, N
    if "attn" in kinds:
        out[(index, "attn")] = weights
    x = x + block.ls_1(attend(block, weights, v))
    y = block.ln_2(x)
    if "ln_2" in kinds:
        out[(index, "ln_2")] = y
    return x + block.ls_2(block.mlp(y))


def _mha_mask(mask: torch.Tensor | None, batch: int, heads: int) -> torch.Tensor | None:
    """An additive mask in a shape ``nn.MultiheadAttention`` takes: ``[N, N]`` or ``[B·heads, N, N]``."""
    if mask is None or mask.dim() == 2:
        return mask
    if mask.dim() == 4:  # B, heads, N, N
        return mask.reshape(-1, *mask.shape[-2:])  # B·heads, N, N
    if mask.shape[0] == 1:
        return mask[0]  # N, N
    if mask.shape[0] != batch * heads:
        raise ValueError(f"attn_mask has {mask.shape[0]} maps, expected 1 or B·heads = {batch * heads}")
    return mask
