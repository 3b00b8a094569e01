"""Kernels for the last step of every dense head: patch–text similarity, bilinear upsampling,
softmax and argmax without the full-resolution logits; mask and box pooling.

``kernel`` picks the path: ``"reference"`` (``reference.py``, the definition, full logits),
``"torch"`` (``cpu.py``, exact and chunked, any device; on a CPU its last step is the fused C
loop of ``native.py`` when a C compiler is there, else plain torch ops), ``"triton"``
(``triton_gpu.py``, fused per tile; GPU, or CPU under ``TRITON_INTERPRET=1``), or ``"auto"``:
Triton for CUDA tensors when it imports, else torch. Triton is imported only when used, so
``import ovdense`` never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ovdense.errors import OvdenseError
from ovdense.kernels.cpu import Window, iter_class_probabilities
from ovdense.kernels.cpu import classify_low as _classify_low_torch
from ovdense.kernels.cpu import slide_classify as _slide_torch
from ovdense.kernels.pooling import mask_pool, roi_pool
from ovdense.kernels.reference import classify_reference, dense_classify_reference

KERNELS = ("auto", "reference", "torch", "triton")

__all__ = ["KERNELS", "Window", "classify_low", "dense_classify", "iter_class_probabilities",
           "mask_pool", "roi_pool", "slide_classify", "resolve_kernel"]


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The concrete path for ``kernel`` on ``device``."""
    if kernel not in KERNELS:
        raise OvdenseError(f"unknown kernel {kernel!r}; choose from: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def classify_low(
    low: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    bg_threshold: float | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution cosine logits ``[B, Q, h, w]`` → labels (int64) and winning
    probabilities ``[B, H, W]``, as ``reference.classify_reference`` on the bilinear upsample."""
    path = resolve_kernel(kernel, low.device)
    if path == "reference":
        up = torch.nn.functional.interpolate(low.float(), size=tuple(out_size), mode="bilinear",
                                             align_corners=False)
        return classify_reference(up, class_of_prompt.to(low.device), logit_scale, bg_threshold)
    if path == "triton":
        from ovdense.kernels.triton_gpu import classify_low_triton

        return classify_low_triton(low, class_of_prompt, out_size, logit_scale, bg_threshold)
    return _classify_low_torch(low, class_of_prompt, out_size, logit_scale, bg_threshold)


def dense_classify(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    class_of_prompt: torch.Tensor,
    out_size: tuple[int, int],
    logit_scale: float,
    bg_threshold: float | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch_emb [B, D, h, w]``, ``text_emb [Q, D]`` (both L2-normalised), ``class_of_prompt
    [Q]`` → labels and scores ``[B, H, W]`` at ``out_size``.

    Equal to ``dense_classify_reference``: labels identical except exact ties, scores within
    1e-5 in fp32.
    """
    if kernel == "reference":
        return dense_classify_reference(patch_emb, text_emb, class_of_prompt.to(patch_emb.device),
                                        out_size, logit_scale, bg_threshold)
    low = torch.einsum("bdhw,qd->bqhw", patch_emb, text_emb.to(patch_emb.dtype))  # B, Q, h, w
    if resolve_kernel(kernel, low.device) != "triton":
        low = low.float()
    return classify_low(low, class_of_prompt, out_size, logit_scale, bg_threshold, kernel)


def slide_classify(
    windows: Sequence[Window],
    canvas_size: tuple[int, int],
    out_size: tuple[int, int],
    class_of_prompt: torch.Tensor,
    logit_scale: float,
    bg_threshold: float | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sliding-window protocol from the windows' low-resolution logits: labels and scores
    ``[H, W]``. ``"reference"`` builds the full canvas; every other path streams it."""
    if resolve_kernel(kernel, windows[0].logits.device) != "reference":
        return _slide_torch(windows, canvas_size, out_size, class_of_prompt, logit_scale, bg_threshold)
    canvas = slide_canvas_reference(windows, canvas_size)  # Q, H', W'
    up = torch.nn.functional.interpolate(canvas[None], size=tuple(out_size), mode="bilinear",
                                         align_corners=False)
    labels, scores = classify_reference(up, class_of_prompt.to(up.device), logit_scale, bg_threshold)
    return labels[0], scores[0]


def slide_canvas_reference(windows: Sequence[Window], canvas_size: tuple[int, int]) -> torch.Tensor:
    """The full ``[Q, H', W']`` canvas: each window's logits upsampled to its padded size,
    cut, summed at its box, divided by the number of windows covering each pixel."""
    Q = windows[0].logits.shape[0]
    device = windows[0].logits.device
    canvas = torch.zeros(Q, *canvas_size, dtype=torch.float32, device=device)
    count = torch.zeros(1, *canvas_size, dtype=torch.float32, device=device)
    for win in windows:
        y1, y2, x1, x2 = win.box
        top, left = win.offset
        up = torch.nn.functional.interpolate(win.logits[None].float(), size=win.padded, mode="bilinear",
                                             align_corners=False)[0]
        canvas[:, y1:y2, x1:x2] += up[:, top:top + y2 - y1, left:left + x2 - x1]
        count[:, y1:y2, x1:x2] += 1
    return canvas / count
