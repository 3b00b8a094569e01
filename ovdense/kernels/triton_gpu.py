"""The Triton kernel: fused bilinear upsampling, online softmax and argmax per output tile.

One program handles ``BLOCK_W`` output pixels of one row of one image. For every block of
``BLOCK_Q`` prompts it gathers the 2×2 low-resolution neighbours of each pixel, interpolates
(PyTorch's bilinear rule, ``align_corners=False``), and folds the block into a running max,
argmax and softmax denominator (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"). Memory is O(tile); fp16/bf16 logits are read as they are and accumulated in fp32.

On CPU tensors it runs under ``TRITON_INTERPRET=1`` (the tests do this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dense_classify_kernel(
    low_ptr, class_ptr, labels_ptr, scores_ptr,
    Q, h, w, H, W,
    scale_h, scale_w, logit_scale, bg_threshold,
    HAS_BG: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0)  # b · H + y
    b = row // H
    y = row % H
    xs = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    x_ok = xs < W

    sy = tl.maximum((y.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    y1 = tl.minimum(y0 + 1, h - 1)
    ly = sy - y0.to(tl.float32)
    sx = tl.maximum((xs.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
    x0 = sx.to(tl.int32)
    x1 = tl.minimum(x0 + 1, w - 1)
    lx = sx - x0.to(tl.float32)

    best = tl.full([BLOCK_W], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_W], tl.float32)
    arg = tl.zeros([BLOCK_W], tl.int32)
    for q0 in range(0, Q, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q)
        q_ok = qs < Q
        mask = q_ok[:, None] & x_ok[None, :]
        base = low_ptr + (b * Q + qs[:, None]).to(tl.int64) * h * w
        v00 = tl.load(base + y0 * w + x0[None, :], mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(base + y0 * w + x1[None, :], mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(base + y1 * w + x0[None, :], mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(base + y1 * w + x1[None, :], mask=mask, other=0.0).to(tl.float32)
        top = (1.0 - lx)[None, :] * v00 + lx[None, :] * v01
        bottom = (1.0 - lx)[None, :] * v10 + lx[None, :] * v11
        value = ((1.0 - ly) * top + ly * bottom) * logit_scale  # BLOCK_Q, BLOCK_W
        value = tl.where(q_ok[:, None], value, float("-inf"))
        block_best = tl.max(value, axis=0)
        block_arg = tl.argmax(value, axis=0).to(tl.int32) + q0
        new_best = tl.maximum(best, block_best)
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(value - new_best[None, :]), axis=0)
        arg = tl.where(block_best > best, block_arg, arg)  # strict: the first prompt wins ties
        best = new_best

    score = 1.0 / total
    label = tl.load(class_ptr + arg, mask=x_ok, other=0)
    if HAS_BG:
        label = tl.where(score < bg_threshold, 0, label)
    out = row.to(tl.int64) * W + xs
    tl.store(labels_ptr + out, label, mask=x_ok)
    tl.store(scores_ptr + out, score, mask=x_ok)


def classify_low_triton(
    low: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    bg_threshold: float | None = None,
    block_q: int = 32,
    block_w: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and scores ``[B, H, W]`` from low-resolution cosine logits ``[B, Q, h, w]``."""
    low = low.contiguous()
    B, Q, h, w = low.shape
    H, W = out_size
    labels = torch.empty(B, H, W, dtype=torch.int64, device=low.device)
    scores = torch.empty(B, H, W, dtype=torch.float32, device=low.device)
    classes = class_of_prompt.to(device=low.device, dtype=torch.int64).contiguous()
    grid = (B * H, triton.cdiv(W, block_w))
    _dense_classify_kernel[grid](
        low, classes, labels, scores, Q, h, w, H, W,
        float(h / H), float(w / W), float(logit_scale),
        float(bg_threshold if bg_threshold is not None else 0.0),
        HAS_BG=bg_threshold is not None, BLOCK_Q=block_q, BLOCK_W=block_w,
    )
    return labels, scores
