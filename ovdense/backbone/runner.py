"""The one way a trained head runs the frozen CLIP vision tower: ``embed`` then ``run_blocks``.

The training-free methods change only the last block (``ovdense.backbone.dense``); trained
heads need more of the tower. SAN runs the first blocks with taps (its trunk), then the last
blocks again on extra tokens under an attention mask (its recognition path); F-ViT taps a few
blocks. Each head calls these two functions instead of writing its own loop over
``visual.transformer.resblocks``::

    x = embed(visual, images)                                   # B, 1 + h·w, W (after ln_pre)
    x, taps = run_blocks(visual, x, 0, 9, taps=(2, 5, 8))       # blocks 0..8, tokens after 2, 5, 8
    y, _ = run_blocks(visual, z, 9, 12, attn_mask=bias)         # blocks 9..11 under a mask

Blocks are 0-indexed; "after ``ln_pre``" is ``embed``'s output. Nothing here holds state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.dense import interpolate_pos_embed, run_block

POS_RESIZE = ("dino", "size")


def resize_pos_embed(pos: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``[1 + g_h·g_w, W]`` → ``[1 + h·w, W]`` by bicubic interpolation to the
    exact output size (``align_corners=False``), the class token's entry kept.

    This is the rule of the official SAN (``resize_pos_embed2d`` in MendelXu/SAN
    ``san/model/attn_helper.py``) and of mmseg's ``VisionTransformer.resize_pos_embed``; it
    differs from ``dense.interpolate_pos_embed`` (the DINO ``scale_factor`` rule of the
    training-free methods) in how the sampling grid is placed. Identity at the native grid.
    """
    if tuple(grid) == tuple(native):
        return pos
    g_h, g_w = native
    patch = pos[1:].reshape(1, g_h, g_w, -1).permute(0, 3, 1, 2)  # 1, W, g_h, g_w
    patch = F.interpolate(patch.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # hw, W
    return torch.cat([pos[:1], patch], dim=0)


def embed(
    visual: nn.Module,
    images: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    resize: str = "dino",
) -> torch.Tensor:
    """Patch embedding, class token, position embedding, then ``ln_pre``: ``[B, 1 + h·w, W]``.

    Args:
        visual: an open_clip ``VisionTransformer`` (``dense.check_supported``).
        images: normalised ``[B, 3, H, W]``, ``H`` and ``W`` multiples of the patch size.
        pos_embed: ``[1 + g_h·g_w, W]`` at the model's native grid, for a head that trains its own
            copy (SAN); ``None`` = the model's own ``positional_embedding``.
        resize: how the position embedding reaches the image's grid: ``"dino"``
            (``dense.interpolate_pos_embed``, what ``dense.embed`` does) or ``"size"``
            (``resize_pos_embed``, the official SAN's and mmseg's rule).
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
    interpolate = interpolate_pos_embed if resize == "dino" else resize_pos_embed
    x = x + interpolate(pos, native, (h, w)).to(x.dtype)
    return visual.ln_pre(x)


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    start: int,
    stop: int,
    taps: Sequence[int] = (),
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run blocks ``[start, stop)`` of the tower on tokens ``x [B, N, W]`` (batch first).

    Args:
        taps: block indices (0-indexed, in ``[start, stop)``) whose output tokens are returned.
        attn_mask: an additive float mask passed to every block's attention:
            ``[N, N]``, ``[1, N, N]``, ``[B, heads, N, N]`` or ``[B·heads, N, N]`` (batch-major,
            the layout of ``nn.MultiheadAttention``); ``None`` for none.
    Returns:
        the tokens after block ``stop - 1`` ``[B, N, W]`` and ``{i: tokens after block i}``.
    """
    blocks = visual.transformer.resblocks
    if not 0 <= start <= stop <= len(blocks):
        raise ValueError(f"blocks [{start}, {stop}) are outside the tower's {len(blocks)} blocks")
    wanted = set(int(i) for i in taps)
    if wanted and (min(wanted) < start or max(wanted) >= stop):
        raise ValueError(f"taps {sorted(wanted)} are outside the blocks run, [{start}, {stop})")
    mask = _mha_mask(attn_mask, x.shape[0], blocks[0].attn.num_heads) if stop > start else None
    out: dict[int, torch.Tensor] = {}
    for index in range(start, stop):
        block = blocks[index]
        if getattr(block.attn, "batch_first", True):
            x = run_block(block, x, attn_mask=mask)  # open_clip's block, attention through SDPA
        else:  # an old-style sequence-first tower: N, B, W inside the block
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        if index in wanted:
            out[index] = x
    return x, out


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
