"""The exact chunked path in plain torch (any device): never builds ``[Q, H, W]``.

Bilinear resizing with ``align_corners=False`` is separable: each output row (column) reads
two input rows (columns) with two weights (PyTorch's rule: source coordinate
``(dst + 0.5) · in / out − 0.5`` clamped at 0). Output rows are processed in chunks; each
chunk needs only the two low-resolution rows under each of its rows, so memory is
``O(Q · rows · W)`` for a chunk instead of ``O(Q · H · W)``. Within a chunk, the columns of
those low-resolution rows are resized first (``_columns``, PyTorch's own kernel), then the
rows by two taps (``_rows``; ``bilinear_taps``' weights are bit for bit PyTorch's), so the
upsampled logits agree with ``F.interpolate`` to rounding: PyTorch's kernel picks its order of
fused multiply–adds by shape, so bit equality is not promised, and a label can differ only
where two classes are within rounding of each other.

The label of a pixel is the class of its best prompt (the max over a class's prompts commutes
with the argmax over classes), and the winning probability is ``1 / Σ_q exp(s · (l_q − l_max))``.

On a CPU the rows, the maximum and the sum of exponentials of each chunk run as one C loop
(``native.py``) when it can be built; otherwise (and on other devices) as torch ops, four
vectorised passes per chunk (``_decide``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ovdense.kernels import native
from ovdense.kernels.reference import class_max

CHUNK_ELEMENTS = 1 << 22  # floats per chunk of upsampled logits (16 MB in fp32)
COMPOSITE_ROWS = 128  # output rows per span of the composed sliding path (a few low-resolution rows each)


def bilinear_taps(in_size: int, out_size: int, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's 1-D bilinear resize (``align_corners=False``) as two taps per output:
    indices ``i0, i1 [out]`` (int64) and weights ``w0, w1 [out]``, ``out = w0·x[i0] + w1·x[i1]``.

    The source coordinate ``scale · (dst + 0.5) − 0.5`` (``scale`` in float32) is evaluated
    exactly in float64 and rounded once to float32: the value of the fused multiply–add that
    PyTorch's compiled kernels use, so the weights are bit for bit its own. A single input
    (``in_size == 1``) is copied, as PyTorch does, rather than split between two equal taps.
    """
    if in_size == 1:
        zeros = torch.zeros(out_size, dtype=torch.int64, device=device)
        ones = torch.ones(out_size, dtype=torch.float32, device=device)
        return zeros, zeros, ones, torch.zeros_like(ones)
    scale = float(torch.tensor(in_size / out_size, dtype=torch.float32))
    dst = torch.arange(out_size, dtype=torch.float64, device=device)
    src = (scale * (dst + 0.5) - 0.5).float().clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    w1 = src - i0.float()
    return i0, i1, 1.0 - w1, w1


def _rows_per_chunk(num_prompts: int, width: int, batch: int, elements: int) -> int:
    return max(1, elements // max(1, num_prompts * width * batch))


def _decide(block: torch.Tensor, class_of_prompt: torch.Tensor, logit_scale: float,
            bg_threshold: float | None, spare: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Q, r, W]`` upsampled logits → labels, scores ``[B, r, W]`` (``block`` is consumed;
    ``spare``, if given, is scratch of the same shape).

    Four passes over the block, each a vectorised reduction or elementwise op (``max(dim=1)``
    with indices is a scalar loop on CPU, 25× slower than ``amax``):

    * ``x = s · l`` (the reference's own rounding, so its argmax is the reference's);
    * ``m = amax_q x``; ``g = x − m`` in place, ``≤ 0`` and exactly 0 where ``x = m``;
    * the first prompt with ``g = 0`` is ``argmin_q (q − 10³⁰ · g)``: nonzero gaps push their
      prompt's index far up, the zeros keep theirs (``max``'s first-maximum rule);
    * ``score = 1 / Σ_q exp(g)``, the winning softmax probability.
    """
    gap = block.mul_(logit_scale)
    gap.sub_(gap.amax(dim=1, keepdim=True))  # B, Q, r, W; 0 at the maxima
    index = _prompt_index(block.shape[1], block.device)  # 1, Q, 1, 1
    spare = torch.empty_like(block) if spare is None else spare
    prompt = torch.add(index, gap, alpha=-_PUSH, out=spare).amin(dim=1).long()  # B, r, W
    scores = gap.exp_().sum(dim=1).reciprocal_()  # B, r, W
    labels = class_of_prompt[prompt]
    if bg_threshold is not None:
        labels = torch.where(scores < bg_threshold, torch.zeros_like(labels), labels)
    return labels, scores


_PUSH = 1e30  # × a nonzero gap (≥ one ulp of the max logit) moves a prompt past every index


def _prompt_index(num_prompts: int, device) -> torch.Tensor:
    """``[1, Q, 1, 1]`` float32 prompt indices (exact below 2²⁴ prompts)."""
    return torch.arange(num_prompts, dtype=torch.float32, device=device).view(1, -1, 1, 1)


Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # i0, i1, w0, w1 [n]


def _columns(part: torch.Tensor, width: int) -> torch.Tensor:
    """Bilinear resize of the last dimension only: ``[B, Q, k, w]`` → ``[B, Q, k, width]``
    (PyTorch's own kernel, rows untouched)."""
    return F.interpolate(part, size=(part.shape[-2], width), mode="bilinear", align_corners=False)


def _rows(wide: torch.Tensor, rows: Taps, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear resize of the second-to-last dimension by ``rows`` (indices into it):
    ``[..., k, W]`` → ``[..., r, W]``, each output ``x1 · w1`` then ``+ x0 · w0`` (fused);
    written into ``out`` if given.

    Consecutive output rows that read the same two input rows (a run; long when upsampling)
    are computed together by broadcasting those rows, without gathering copies of them;
    small inputs, where per-run calls would cost more than the copies, are gathered."""
    i0, i1, a0, a1 = rows
    runs = _runs(i0.tolist(), i1.tolist())
    if out is None:
        out = wide.new_empty(*wide.shape[:-2], len(i0), wide.shape[-1])
    if wide[..., :1, :].numel() * (len(i0) / len(runs)) < (1 << 14):
        torch.mul(wide[..., i1, :], a1[:, None], out=out)
        return out.addcmul_(wide[..., i0, :], a0[:, None])
    for start, stop, k0, k1 in runs:
        part = out[..., start:stop, :]
        torch.mul(wide[..., k1:k1 + 1, :], a1[start:stop, None], out=part)
        part.addcmul_(wide[..., k0:k0 + 1, :], a0[start:stop, None])
    return out


def _runs(i0: list[int], i1: list[int]) -> list[tuple[int, int, int, int]]:
    """Maximal runs ``(start, stop, k0, k1)`` of outputs with the same two input indices."""
    runs = []
    start = 0
    for r in range(1, len(i0) + 1):
        if r == len(i0) or i0[r] != i0[start] or i1[r] != i1[start]:
            runs.append((start, r, i0[start], i1[start]))
            start = r
    return runs


def _slice_taps(taps: Taps, start: int, stop: int, shift: int = 0) -> Taps:
    """Outputs ``start:stop`` of ``taps``, their indices moved by ``−shift``."""
    i0, i1, w0, w1 = taps
    return i0[start:stop] - shift, i1[start:stop] - shift, w0[start:stop], w1[start:stop]


def _upsampled_chunks(low: torch.Tensor, out_size: tuple[int, int], elements: int, reuse: bool = False
                      ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(r0, r1, up(low)[:, :, r0:r1])`` for ``low [B, Q, h, w]``: per chunk, the
    columns of the low-resolution rows it reads, then its rows from those. With ``reuse``,
    every chunk is written into the same memory (the caller is done with a chunk when it asks
    for the next)."""
    B, Q, h, w = low.shape
    H, W = out_size
    rows = bilinear_taps(h, H, low.device)
    step = min(H, _rows_per_chunk(Q, W, B, elements))
    buffer = low.new_empty(B * Q * step * W) if reuse else None
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        lo, hi = int(rows[0][r0]), int(rows[1][r1 - 1]) + 1  # the low-resolution rows this chunk reads
        wide = _columns(low[:, :, lo:hi], W)  # B, Q, hi-lo, W
        out = None if buffer is None else buffer[:B * Q * (r1 - r0) * W].view(B, Q, r1 - r0, W)
        yield r0, r1, _rows(wide, _slice_taps(rows, r0, r1, lo), out)  # B, Q, r, W


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
    if _fused(low):
        return _classify_fused(low.float(), class_of_prompt, out_size, logit_scale, bg_threshold,
                               chunk_elements)
    spare = None
    for r0, r1, block in _upsampled_chunks(low.float(), out_size, chunk_elements, reuse=True):
        if spare is None:
            spare = torch.empty_like(block).view(-1)
        view = spare[:block.numel()].view(block.shape)  # scratch for the decision, B, Q, r, W
        labels[:, r0:r1], scores[:, r0:r1] = _decide(block, class_of_prompt, logit_scale, bg_threshold, view)
    return labels, scores


def _fused(tensor: torch.Tensor) -> bool:
    """Whether the fused C decision (``native.py``) serves this tensor: CPU, and built."""
    return tensor.device.type == "cpu" and native.available()


def _row_spans(rows: Taps, max_low_rows: int) -> Iterator[tuple[int, int, int, int]]:
    """Split the output rows into spans ``(r0, r1, lo, hi)`` that read at most
    ``max_low_rows`` input rows ``lo:hi`` each (at least the two under one output row)."""
    i0, i1 = rows[0].tolist(), rows[1].tolist()
    r0 = 0
    while r0 < len(i0):
        lo, r1 = i0[r0], r0 + 1
        while r1 < len(i0) and i1[r1] - lo < max(2, max_low_rows):
            r1 += 1
        yield r0, r1, lo, i1[r1 - 1] + 1
        r0 = r1


def _finish(prompt: torch.Tensor, scores: torch.Tensor, class_of_prompt: torch.Tensor,
            bg_threshold: float | None) -> torch.Tensor:
    """Winning prompts → labels: their classes, 0 below ``bg_threshold``."""
    identity = torch.equal(class_of_prompt, torch.arange(len(class_of_prompt), device=prompt.device))
    labels = prompt if identity else class_of_prompt[prompt]
    if bg_threshold is not None:
        labels.masked_fill_(scores < bg_threshold, 0)
    return labels


def _classify_fused(low: torch.Tensor, class_of_prompt: torch.Tensor, out_size: tuple[int, int],
                    logit_scale: float, bg_threshold: float | None, chunk_elements: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``classify_low`` by the fused C decision: per span of output rows, PyTorch resizes the
    columns of the low-resolution rows it reads (at most ``chunk_elements`` floats), the C
    loop does the rest."""
    B, Q, h, _ = low.shape
    H, W = out_size
    prompt = torch.empty(B, H, W, dtype=torch.int64)
    scores = torch.empty(B, H, W, dtype=torch.float32)
    rows = bilinear_taps(h, H)
    for r0, r1, lo, hi in _row_spans(rows, chunk_elements // max(1, B * Q * W)):
        wide = _columns(low[:, :, lo:hi], W)  # B, Q, hi-lo, W
        native.decide_rows(wide, _slice_taps(rows, r0, r1, lo), logit_scale,
                           prompt[:, r0:r1], scores[:, r0:r1])
    return _finish(prompt, scores, class_of_prompt, bg_threshold), scores


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
    if _fused(windows[0].logits):
        composite = _slide_composite(windows, canvas_size, out_size, logit_scale)
        if composite is not None:
            prompt, scores = composite
            return _finish(prompt, scores, class_of_prompt.to(prompt.device), bg_threshold), scores
    device = windows[0].logits.device
    Q = windows[0].logits.shape[0]
    Hc, Wc = canvas_size
    H, W = out_size
    count = torch.zeros(Hc, Wc, dtype=torch.float32, device=device)
    plans = []
    for win in windows:
        y1, y2, x1, x2 = win.box
        count[y1:y2, x1:x2] += 1
        h = win.logits.shape[-2]
        top, left = win.offset
        rows = _slice_taps(bilinear_taps(h, win.padded[0], device), top, top + y2 - y1)  # y2-y1
        plans.append((win.box, win.logits.float()[None], rows, win.padded[1], left))
    if (count == 0).any():
        raise ValueError("the windows do not cover the canvas")
    rows = bilinear_taps(Hc, H, device)
    labels = torch.empty(H, W, dtype=torch.int64, device=device)
    scores = torch.empty(H, W, dtype=torch.float32, device=device)
    class_of_prompt = class_of_prompt.to(device)
    fused = _fused(count)
    step = _rows_per_chunk(Q, max(W, Wc), 1, chunk_elements)
    for r0 in range(0, H, step):
        r1 = min(H, r0 + step)
        c0, c1 = int(rows[0][r0]), int(rows[1][r1 - 1]) + 1  # the canvas rows this chunk reads
        canvas = torch.zeros(Q, c1 - c0, Wc, dtype=torch.float32, device=device)
        for (y1, y2, x1, x2), low, win_rows, width, left in plans:
            a, b = max(y1, c0), min(y2, c1)
            if a >= b:
                continue
            taps = _slice_taps(win_rows, a - y1, b - y1)
            lo, hi = int(taps[0][0]), int(taps[1][-1]) + 1  # the window's low-resolution rows
            wide = _columns(low[:, :, lo:hi], width)[0, :, :, left:left + x2 - x1]  # Q, hi-lo, x2-x1
            canvas[:, a - c0:b - c0, x1:x2] += _rows(wide, _slice_taps(taps, 0, b - a, lo))
        canvas /= count[c0:c1]
        wide = _columns(canvas[None], W)  # 1, Q, c1-c0, W
        if fused:  # the winning prompts go to labels, mapped to classes at the end
            native.decide_rows(wide, _slice_taps(rows, r0, r1, c0), logit_scale,
                               labels[None, r0:r1], scores[None, r0:r1])
            continue
        block = _rows(wide, _slice_taps(rows, r0, r1, c0))  # 1, Q, r, W
        chunk_labels, chunk_scores = _decide(block, class_of_prompt, logit_scale, bg_threshold)
        labels[r0:r1], scores[r0:r1] = chunk_labels[0], chunk_scores[0]
    if fused:
        labels = _finish(labels, scores, class_of_prompt, bg_threshold)
    return labels, scores


# --------------------------------------------------------------------------------------------
# Sliding windows on a grid: both resizes composed per axis


def _tap_matrix(taps: Taps, size: int) -> torch.Tensor:
    """``[n, size]`` float64: the linear map of 1-D bilinear taps (``w0`` at ``i0``, ``w1`` at ``i1``)."""
    i0, i1, w0, w1 = taps
    out = torch.zeros(len(i0), size, dtype=torch.float64)
    rows = torch.arange(len(i0))
    out.index_put_((rows, i0.cpu()), w0.cpu().double(), accumulate=True)
    out.index_put_((rows, i1.cpu()), w1.cpu().double(), accumulate=True)
    return out


def _placed(low: int, padded: int, offset: int, start: int, stop: int, canvas: int) -> torch.Tensor:
    """``[canvas, low]``: one window's 1-D upsampling (``low`` → ``padded``), cropped at ``offset`` and
    placed at ``start:stop`` of the canvas, zero elsewhere."""
    out = torch.zeros(canvas, low, dtype=torch.float64)
    out[start:stop] = _tap_matrix(_slice_taps(bilinear_taps(low, padded), offset, offset + stop - start), low)
    return out


def _slide_composite(windows: Sequence[Window], canvas_size: tuple[int, int], out_size: tuple[int, int],
                     logit_scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``slide_classify`` on the fused kernel with the two resizes of each axis composed into one
    linear map, for windows on a grid (mmseg's ``slide_inference``: every row band × every column
    span, so the canvas count is ``count(y, x) = c_y(y) · c_x(x)``); ``None`` for other layouts.

    Each axis's chain — a window's bilinear upsampling to its padded size, the crop, the placement
    on the canvas, the division by the count, the canvas's bilinear resize to the output — is one
    matrix (float64, then float32), built once per call. Per row band, the windows' low-resolution
    logits go through the column maps (one matrix product per window: ``[Q·h, w] @ [w, W]``) and are
    summed, for the few low-resolution rows that a span of ``COMPOSITE_ROWS`` output rows reads
    (``[Q, n, W]``, never the ``[Q, H', W']`` canvas: memory stays ~``Q · 6 · W`` floats). The row
    maps, stacked over the bands, give each output row a few taps (2–3 per band) into those rows,
    which the C loop (``native.decide_taps``) combines, scales and decides, row by row. Equal to the
    canvas path up to float32 rounding (the sums are associated differently): a label can differ
    only where two prompts are within rounding of each other. Returns the winning prompts and
    scores ``[H, W]``.
    """
    Hc, Wc = canvas_size
    H, W = out_size
    rows_of = sorted({(w.box[0], w.box[1]) for w in windows})
    cols_of = sorted({(w.box[2], w.box[3]) for w in windows})
    if len(windows) != len(rows_of) * len(cols_of):
        return None
    c_y, c_x = torch.zeros(Hc, dtype=torch.float64), torch.zeros(Wc, dtype=torch.float64)
    for y1, y2 in rows_of:
        c_y[y1:y2] += 1
    for x1, x2 in cols_of:
        c_x[x1:x2] += 1
    if (c_y == 0).any() or (c_x == 0).any():
        raise ValueError("the windows do not cover the canvas")
    bands: dict[tuple, list[Window]] = {}
    for win in windows:
        key = (win.box[0], win.box[1], win.padded[0], win.offset[0], win.logits.shape[-2])
        bands.setdefault(key, []).append(win)
    if len(bands) != len(rows_of) or any(len(b) != len(cols_of) for b in bands.values()):
        return None
    final_rows = _tap_matrix(bilinear_taps(Hc, H), Hc)  # H, Hc
    final_cols = _tap_matrix(bilinear_taps(Wc, W), Wc)  # W, Wc
    row_maps, plans, first = [], [], 0  # plans: (first K row of the band, h, [(logits, column map)])
    for (y1, y2, padded_h, top, h), members in bands.items():
        row_maps.append(final_rows @ (_placed(h, padded_h, top, y1, y2, Hc) / c_y[:, None]))  # H, h
        columns = []
        for win in members:
            x1, x2, w = win.box[2], win.box[3], win.logits.shape[-1]
            col_map = final_cols @ (_placed(w, win.padded[1], win.offset[1], x1, x2, Wc) / c_x[:, None])
            columns.append((win.logits.float(), col_map.T.float().to(win.logits.device)))  # w, W
        plans.append((first, h, columns))
        first += h
    row_map = torch.cat(row_maps, dim=1)  # H, K
    nonzero = row_map != 0
    taps = max(1, int(nonzero.sum(dim=1).max()))
    index = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :taps]  # H, T
    weight = row_map.gather(1, index).float()  # zero where a row has fewer taps
    Q = windows[0].logits.shape[0]
    prompt = torch.empty(1, H, W, dtype=torch.int64)
    scores = torch.empty(1, H, W, dtype=torch.float32)
    position = torch.full((first,), -1, dtype=torch.int64)
    for r0 in range(0, H, COMPOSITE_ROWS):  # memory: the few low rows a span of output rows reads
        r1 = min(H, r0 + COMPOSITE_ROWS)
        used = torch.unique(index[r0:r1][weight[r0:r1] != 0])
        if used.numel() == 0:
            used = index[r0:r1, :1].unique()
        wide = torch.zeros(1, Q, len(used), W)
        position[used] = torch.arange(len(used))
        for start, h, columns in plans:
            a, b = int(torch.searchsorted(used, start)), int(torch.searchsorted(used, start + h))
            if a == b:
                continue
            rows = used[a:b] - start  # used is sorted: the band's rows are positions a:b
            for low, col_map in columns:  # [Q·n, w] @ [w, W]
                part = low[:, rows].reshape(-1, low.shape[-1]) @ col_map
                wide[0, :, a:b] += part.view(Q, b - a, W)
        local = position[index[r0:r1]].masked_fill_(weight[r0:r1] == 0, 0)  # padding taps: any row
        native.decide_taps(wide, (local, weight[r0:r1]), logit_scale, prompt[:, r0:r1], scores[:, r0:r1])
    return prompt[0], scores[0]
