"""COCO run-length encoding of binary masks, in plain numpy (no pycocotools needed).

The COCO format (``pycocotools/common/maskApi.c``): the mask is read in column-major
(Fortran) order; ``counts`` alternate runs of 0s and 1s, starting with 0s (a leading run may
be 0 long). The compressed string stores each count, after the first two, as the difference
from the count two places before; every number is written in 5-bit groups, least significant
first, as characters ``48 + group`` with bit ``0x20`` set while more groups follow, and the
last group's bit ``0x10`` carrying the sign.
"""

from __future__ import annotations

import numpy as np


def run_lengths(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a ``[H, W]`` mask (column-major, starting with zeros)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return [int(c) for c in counts]


def _compress(counts: list[int]) -> str:
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _decompress(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift, more = 0, 0, True
        while more:
            c = ord(text[pos]) - 48
            x |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * shift)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict:
    """``[H, W]`` bool mask → ``{"size": [H, W], "counts": str}`` (compressed COCO RLE)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _compress(run_lengths(mask))}


def decode(rle: dict) -> np.ndarray:
    """Compressed (``counts`` str) or uncompressed (``counts`` list) COCO RLE → ``[H, W]`` bool."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _decompress(counts)
    if sum(counts) != height * width:
        raise ValueError(f"RLE counts sum to {sum(counts)}, not {height}×{width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def area(rle: dict) -> int:
    """Number of foreground pixels."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _decompress(counts.decode("ascii") if isinstance(counts, bytes) else counts)
    return int(sum(counts[1::2]))


def bbox(mask: np.ndarray) -> list[float]:
    """COCO box ``[x, y, w, h]`` of a mask (pixel extents; zeros for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
