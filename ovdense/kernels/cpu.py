"""The exact chunked path in plain torch (any device): never builds ``[Q, H, W]``.

Bilinear resizing with ``align_corners=False`` is separable: ``up(L) = R · L · Cᵀ`` with
``R [H, h]`` and ``C [W, w]`` holding two weights per row (PyTorch's rule: source coordinate
``(dst + 0.5) · in / out − 0.5`` clamped at 0). Output rows are processed in chunks; each
chunk needs only the two low-resolution rows under each of its rows, so memory is
``O(Q · rows · W)`` for a chunk instead of ``O(Q · H · W)``. Within a chunk, both passes are
two-tap gathers (``bilinear_taps``), columns first and then rows, in the order PyTorch's own
kernel interpolates, rather than products with the dense ``R`` and ``C``.

The label of a pixel is the class of its best prompt (the max over a class's prompts commutes
with the argmax over classes), and the winning probability is ``1 / Σ_q exp(s · (l_q − l_max))``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ovdense.kernels.reference import class_max

CHUNK_ELEMENTS = 1 << 20  # floats per chunk of upsampled logits (4 MB in fp32: stays in cache)


def bilinear_taps(in_size: int, out_size: int, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's 1-D bilinear resize (``align_corners=False``) as two taps per output:
    indices ``i0, i1 [out]`` (int64) and weights ``w0, w1 [out]``, ``out = w0·x[i0] + w1·x[i1]``."""
    scale = in_size / out_size
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = ((dst + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    w1 = src - i0.float()
    return i0, i1, 1.0 - w1, w1


def bilinear_matrix(in_size: int, out_size: int, device=None) -> torch.Tensor:
    """``[out, in]`` weights of PyTorch's 1-D bilinear resize (``align_corners=False``): the
    taps of ``bilinear_taps`` as a matrix (both taps on one index add up)."""
    i0, i1, w0, w1 = bilinear_taps(in_size, out_size, device)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float32, device=device)
    rows = torch.arange(out_size, device=device)
    matrix.index_put_((rows, i0), w0, accumulate=True)
    matrix.index_put_((rows, i1), w1, accumulate=True)
    return matrix


def _support(matrix: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last input index with a nonzero weight in ``matrix [n, in]``."""
    used = torch.nonzero(matrix.abs().sum(dim=0) > 0).flatten()
    return int(used[0]), int(used[-1]) + 1


def _rows_per_chunk(num_prompts: int, width: int, batch: int, elements: int) -> int:
    return max(1, elements // max(1, num_prompts * width * batch))


def _decide(block: torch.Tensor, class_of_prompt: torch.Tensor, logit_scale: float,
            bg_threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Q, r, W]`` upsampled logits → labels, scores ``[B, r, W]`` (``block`` is consumed)."""
    scaled = block.mul_(logit_scale)
    best, prompt = scaled.max(dim=1)  # B, r, W
    scores = scaled.sub_(best.unsqueeze(1)).exp_().sum(dim=1).reciprocal_()
    labels = class_of_prompt[prompt]
    if bg_threshold is not None:
        labels = torch.where(scores < bg_threshold, torch.zeros_like(labels), labels)
    return labels, scores


def _upsampled_chunks(low: torch.Tensor, out_size: tuple[int, int], elements: int
                      ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, r1, up(low)[:, :, r0:r1])`` for ``low [B, Q, h, w]``."""
    B, Q, h, w = low.shape
    H, W = out_size
    c0, c1, cw0, cw1 = bilinear_taps(w, W, low.device)
    i0, i1, rw0, rw1 = bilinear_taps(h, H, low.device)
    step = _rows_per_chunk(Q, W, B, elements)
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        lo, hi = int(i0[r0]), int(i1[r1 - 1]) + 1  # the low-resolution rows this chunk reads
        part = low[:, :, lo:hi]
        wide = part.index_select(3, c0).mul_(cw0).addcmul_(part.index_select(3, c1), cw1)  # B, Q, k, W
        block = wide.index_select(2, i0[r0:r1] - lo).mul_(rw0[r0:r1, None])
        yield r0, r1, block.addcmul_(wide.index_select(2, i1[r0:r1] - lo), rw1[r0:r1, None])  # B, Q, r, W


def dense_classify_torch(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    bg_threshold: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[B, H, W]`` (int64) and scores ``[B, H, W]`` equal to the reference."""
    low = torch.einsum("bdhw,qd->bqhw", patch_emb.float(), text_emb.float())  # B, Q, h, w
    return classify_low(low, class_of_prompt, out_size, logit_scale, bg_threshold, chunk_elements)


def classify_low(
    low: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    bg_threshold: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from low-resolution cosine logits ``[B, Q, h, w]``."""
    B = low.shape[0]
    H, W = out_size
    labels = torch.empty(B, H, W, dtype=torch.int64, device=low.device)
    scores = torch.empty(B, H, W, dtype=torch.float32, device=low.device)
    class_of_prompt = class_of_prompt.to(low.device)
    for r0, r1, block in _upsampled_chunks(low.float(), out_size, chunk_elements):
        labels[:, r0:r1], scores[:, r0:r1] = _decide(block, class_of_prompt, logit_scale, bg_threshold)
    return labels, scores


def iter_class_probabilities(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Per-class probabilities one row chunk at a time: ``(r0, r1, [B, C, r1 − r0, W])``."""
    low = torch.einsum("bdhw,qd->bqhw", patch_emb.float(), text_emb.float())
    class_of_prompt = class_of_prompt.to(low.device)
    num_classes = int(class_of_prompt.max()) + 1
    for r0, r1, block in _upsampled_chunks(low, out_size, chunk_elements):
        yield r0, r1, class_max(torch.softmax(block * logit_scale, dim=1), class_of_prompt, num_classes)


# --------------------------------------------------------------------------------------------
# Sliding windows


@dataclass(frozen=True)
class Window:
    """One window's low-resolution logits and where its upsampled logits land.

    ``logits [Q, h, w]`` are upsampled bilinearly to the padded window ``padded = (Hp, Wp)``,
    then rows ``top : top + (y2 − y1)`` and columns ``left : left + (x2 − x1)`` are added to the
    canvas at ``[y1:y2, x1:x2]``.
    """

    box: tuple[int, int, int, int]  # y1, y2, x1, x2 on the canvas
    logits: torch.Tensor  # Q, h, w
    padded: tuple[int, int]
    offset: tuple[int, int] = (0, 0)  # top, left


def slide_classify(
    windows: Sequence[Window],
    canvas_size: tuple[int, int],
    out_size: tuple[int, int],
    class_of_prompt: torch.Tensor,
    logit_scale: float,
    bg_threshold: float | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg's sliding-window protocol without the ``[Q, H', W']`` canvas: labels and scores
    ``[H, W]`` equal to averaging the windows' upsampled logits on the canvas, resizing the
    canvas to ``out_size`` and classifying.

    The canvas is linear in the windows' low-resolution logits, so each chunk of output rows
    builds only the canvas rows under it, from the windows that cover them.
    """
    if not windows:
        raise ValueError("no windows")
    device = windows[0].logits.device
    Q = windows[0].logits.shape[0]
    Hc, Wc = canvas_size
    H, W = out_size
    count = torch.zeros(Hc, Wc, dtype=torch.float32, device=device)
    plans = []
    for win in windows:
        y1, y2, x1, x2 = win.box
        count[y1:y2, x1:x2] += 1
        h, w = win.logits.shape[-2:]
        top, left = win.offset
        rows = bilinear_matrix(h, win.padded[0], device)[top:top + y2 - y1]  # y2-y1, h
        cols = bilinear_matrix(w, win.padded[1], device)[left:left + x2 - x1]  # x2-x1, w
        plans.append((win.box, win.logits.float(), rows, cols))
    if (count == 0).any():
        raise ValueError("the windows do not cover the canvas")
    R = bilinear_matrix(Hc, H, device)
    C = bilinear_matrix(Wc, W, device)
    labels = torch.empty(H, W, dtype=torch.int64, device=device)
    scores = torch.empty(H, W, dtype=torch.float32, device=device)
    class_of_prompt = class_of_prompt.to(device)
    step = _rows_per_chunk(Q, max(W, Wc), 1, chunk_elements)
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        c0, c1 = _support(R[r0:r1])  # the canvas rows this chunk reads
        canvas = torch.zeros(Q, c1 - c0, Wc, dtype=torch.float32, device=device)
        for (y1, y2, x1, x2), low, rows, cols in plans:
            a, b = max(y1, c0), min(y2, c1)
            if a >= b:
                continue
            part = torch.einsum("rh,qhw->qrw", rows[a - y1:b - y1], low)  # Q, b-a, w
            canvas[:, a - c0:b - c0, x1:x2] += torch.einsum("qrw,Xw->qrX", part, cols)
        canvas /= count[c0:c1]
        block = torch.einsum("rc,qcw->qrw", R[r0:r1, c0:c1], canvas)  # Q, r, Wc
        block = torch.einsum("qrw,Ww->qrW", block, C)  # Q, r, W
        chunk_labels, chunk_scores = _decide(block[None], class_of_prompt, logit_scale, bg_threshold)
        labels[r0:r1], scores[r0:r1] = chunk_labels[0], chunk_scores[0]
    return labels, scores
