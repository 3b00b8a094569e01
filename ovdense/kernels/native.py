"""The fused CPU decision: row interpolation, scaling, the first maximum over prompts and the
sum of exponentials in one pass over each output row, in a small C function built on first use.

The torch path (``cpu.py``) needs a separate pass over the ``[Q, r, W]`` block for each of
those steps; this loop computes an output row's ``Q × W`` logits into a buffer that stays in
the core's cache and reads it twice (maximum, then ``Σ exp``). The column resize stays
PyTorch's own (``cpu._columns``); the row interpolation and the scaling are written with the
same roundings as the torch path (``x1·w1 + x0·w0`` rounded after each product and the sum,
then ``· s``; built with ``-ffp-contract=off`` so the compiler fuses nothing), so the labels
are the torch path's bit for bit and the scores agree to 1e-6 (the exponential is a Cephes
polynomial, 2 ulp). ``decide_taps`` is the same decision (the same row helpers in C, the same
Python runner) with any number of row taps, for the composed sliding path (``cpu._slide_composite``).

The library is compiled with the system's C compiler (``$CC``, else ``cc``/``gcc``) into
``$OVDENSE_CACHE/kernels`` (default ``~/.cache/ovdense/kernels``), keyed by the source, the
flags and the machine, written atomically; it has no dependency on torch's headers, so the
build takes about a second. ``ctypes`` releases the GIL during the call, so the rows are
shared between ``torch.get_num_threads()`` Python threads. Where there is no compiler, the
build fails or ``OVDENSE_NATIVE=0`` is set, ``available()`` is False and callers use the torch
path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2 ulp);
   below -87 it returns exp(-87) ~ 1.6e-38, a negligible term beside the maximum's 1. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f; /* t rounded to the nearest integer */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* One output row's decision around the prompts' logits x [Q][W] (scaled, in buf), which the
   caller writes while tracking the first maximum: the row's state before, its end after. */
static inline void begin_row(int64_t W, float *best, int32_t *arg, float *total) {
    for (int64_t w = 0; w < W; ++w) {
        best[w] = -__builtin_inff();
        arg[w] = 0;
        total[w] = 0.0f;
    }
}

static inline void track_max(int64_t W, const float *x, int32_t q, float *best, int32_t *arg) {
    for (int64_t w = 0; w < W; ++w) {
        const int up = x[w] > best[w];
        best[w] = up ? x[w] : best[w];
        arg[w] = up ? q : arg[w];
    }
}

static inline void end_row(int64_t Q, int64_t W, const float *buf, const float *best, const int32_t *arg,
                           float *total, int64_t *p_out, float *s_out) {
    for (int64_t q = 0; q < Q; ++q) {
        const float *x = buf + q * W;
        for (int64_t w = 0; w < W; ++w) total[w] += exp_nonpositive(x[w] - best[w]);
    }
    for (int64_t w = 0; w < W; ++w) {
        p_out[w] = arg[w];
        s_out[w] = 1.0f / total[w];
    }
}

/* wide [B][Q][K][W]: the column-resized low-resolution rows; output rows j in [j0, j1) read
   rows i0[j], i1[j] of K with weights a0[j], a1[j]. Writes the first maximising prompt and
   1 / sum_q exp(x_q - x_max) of x = (x1 a1 + x0 a0) s to prompt/score + b*out_stride + j*W. */
int ovdense_decide_rows(const float *wide, int64_t B, int64_t Q, int64_t K, int64_t W,
                        const int64_t *i0, const int64_t *i1, const float *a0, const float *a1,
                        int64_t j0, int64_t j1, float scale, int64_t out_stride,
                        int64_t *prompt, float *score) {
    float *buf = (float *)malloc(sizeof(float) * (size_t)(Q * W + 2 * W));
    int32_t *arg = (int32_t *)malloc(sizeof(int32_t) * (size_t)W);
    if (buf == NULL || arg == NULL) {
        free(buf);
        free(arg);
        return 1;
    }
    float *best = buf + Q * W, *total = best + W;
    for (int64_t b = 0; b < B; ++b) {
        const float *base = wide + b * Q * K * W;
        for (int64_t j = j0; j < j1; ++j) {
            const float w0 = a0[j], w1 = a1[j];
            begin_row(W, best, arg, total);
            for (int64_t q = 0; q < Q; ++q) {
                const float *x0 = base + (q * K + i0[j]) * W;
                const float *x1 = base + (q * K + i1[j]) * W;
                float *x = buf + q * W;
                for (int64_t w = 0; w < W; ++w) {
                    float v = x1[w] * w1;
                    float u = x0[w] * w0;
                    x[w] = (v + u) * scale;
                }
                track_max(W, x, (int32_t)q, best, arg);
            }
            end_row(Q, W, buf, best, arg, total, prompt + b * out_stride + j * W,
                    score + b * out_stride + j * W);
        }
    }
    free(buf);
    free(arg);
    return 0;
}

/* The same decision with T taps per output row: rows idx[j*T + t] of K (the same for every
   prompt) with weights wt[j*T + t], x = (sum_t x_t wt_t, added in t order) s. */
int ovdense_decide_taps(const float *wide, int64_t B, int64_t Q, int64_t K, int64_t W,
                        const int64_t *idx, const float *wt, int64_t T,
                        int64_t j0, int64_t j1, float scale, int64_t out_stride,
                        int64_t *prompt, float *score) {
    float *buf = (float *)malloc(sizeof(float) * (size_t)(Q * W + 2 * W));
    int32_t *arg = (int32_t *)malloc(sizeof(int32_t) * (size_t)W);
    if (buf == NULL || arg == NULL) {
        free(buf);
        free(arg);
        return 1;
    }
    float *best = buf + Q * W, *total = best + W;
    for (int64_t b = 0; b < B; ++b) {
        const float *base = wide + b * Q * K * W;
        for (int64_t j = j0; j < j1; ++j) {
            const int64_t *rows = idx + j * T;
            const float *weights = wt + j * T;
            begin_row(W, best, arg, total);
            for (int64_t q = 0; q < Q; ++q) {
                float *x = buf + q * W;
                const float *x0 = base + (q * K + rows[0]) * W;
                const float c0 = weights[0];
                for (int64_t w = 0; w < W; ++w) x[w] = x0[w] * c0;
                for (int64_t t = 1; t < T; ++t) {
                    const float *xt = base + (q * K + rows[t]) * W;
                    const float ct = weights[t];
                    for (int64_t w = 0; w < W; ++w) x[w] = x[w] + xt[w] * ct;
                }
                for (int64_t w = 0; w < W; ++w) x[w] = x[w] * scale;
                track_max(W, x, (int32_t)q, best, arg);
            }
            end_row(Q, W, buf, best, arg, total, prompt + b * out_stride + j * W,
                    score + b * out_stride + j * W);
        }
    }
    free(buf);
    free(arg);
    return 0;
}
"""

# -fno-trapping-math lets the compiler vectorise the branch-free selects; no flag reorders arithmetic
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC",
         "-shared"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def _cache_folder() -> Path:
    """``kernels/`` in ovdense's one cache folder (``backbone.prompts.default_cache_dir``'s rule,
    restated here so that the kernels do not import the layer above them)."""
    return Path(os.environ.get("OVDENSE_CACHE", Path.home() / ".cache" / "ovdense")) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    key = hashlib.sha256("\n".join([SOURCE, compiler, *FLAGS, platform.machine(), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    folder = _cache_folder()
    target = folder / f"ovdense_decide_{key}.so"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            source = Path(tmp) / "decide.c"
            source.write_text(SOURCE)
            built = Path(tmp) / target.name
            done = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
            os.replace(built, target)  # atomic: a concurrent build writes the same bytes
    library = ctypes.CDLL(str(target))
    fn = library.ovdense_decide_rows
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, i64, ptr, ptr]
    fn.restype = ctypes.c_int
    fn = library.ovdense_decide_taps
    fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, ctypes.c_float, i64, ptr, ptr]
    fn.restype = ctypes.c_int
    return library


def _cpu_flags() -> str:
    """The processor's feature flags (``-march=native`` code runs only where they match)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def available() -> bool:
    """True when the fused library is built (or builds now) and ``OVDENSE_NATIVE`` is not 0."""
    global _library, _failure
    if os.environ.get("OVDENSE_NATIVE", "1") == "0":
        return False
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _failure = str(e)
        return _library is not None


def failure() -> str | None:
    """Why the library could not be built, if it could not."""
    return _failure


def decide_rows(
    wide: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    logit_scale: float,
    prompt: torch.Tensor,
    score: torch.Tensor,
) -> None:
    """``wide [B, Q, K, W]`` (float32, CPU) and row taps ``(i0, i1, a0, a1) [r]`` (indices into
    ``K``) → writes the winning prompt (int64) and its probability into ``prompt`` and
    ``score``, ``[B, r, W]`` views whose rows are contiguous (e.g. ``labels[:, r0:r1]``)."""
    i0, i1 = (t.to(torch.int64).contiguous() for t in rows[:2])
    a0, a1 = (t.to(torch.float32).contiguous() for t in rows[2:])
    _run("ovdense_decide_rows", wide, (i0.data_ptr(), i1.data_ptr(), a0.data_ptr(), a1.data_ptr()),
         len(i0), logit_scale, prompt, score)


def decide_taps(
    wide: torch.Tensor,
    taps: tuple[torch.Tensor, torch.Tensor],
    logit_scale: float,
    prompt: torch.Tensor,
    score: torch.Tensor,
) -> None:
    """``decide_rows`` with any number of row taps: ``taps = (index [r, T] int64, weight [r, T])``,
    output row ``j`` being ``Σ_t wide[..., index[j, t], :] · weight[j, t]`` (added in ``t`` order;
    a zero weight pads a row with fewer taps)."""
    index = taps[0].to(torch.int64).contiguous()
    weight = taps[1].to(torch.float32).contiguous()
    r, T = index.shape
    if weight.shape != (r, T) or T < 1:
        raise ValueError("taps must be index and weight tensors of one shape [r, T], T ≥ 1")
    if r and (int(index.min()) < 0 or int(index.max()) >= wide.shape[2]):
        raise ValueError(f"tap indices must lie in [0, {wide.shape[2]})")
    _run("ovdense_decide_taps", wide, (index.data_ptr(), weight.data_ptr(), T), r, logit_scale, prompt, score)


def _run(name: str, wide: torch.Tensor, taps: tuple, r: int, logit_scale: float, prompt: torch.Tensor,
         score: torch.Tensor) -> None:
    """Call the C decision ``name`` on output rows ``[0, r)``, split between
    ``torch.get_num_threads()`` threads; ``taps``: its arguments after ``wide, B, Q, K, W``."""
    if not available():
        raise RuntimeError(f"the fused kernel is not available: {_failure}")
    wide = wide.contiguous()
    B, Q, K, W = wide.shape
    for out in (prompt, score):
        if out.shape != (B, r, W) or out.stride(2) != 1 or out.stride(1) != W:
            raise ValueError("outputs must be [B, r, W] with contiguous rows")
    if prompt.stride(0) != score.stride(0):
        raise ValueError("prompt and score must have the same batch stride")
    fn = getattr(_library, name)
    args = (wide.data_ptr(), B, Q, K, W, *taps)
    threads = max(1, min(torch.get_num_threads(), r))
    bounds = [r * t // threads for t in range(threads + 1)]

    def run(t: int) -> int:
        return fn(*args, bounds[t], bounds[t + 1], float(logit_scale), prompt.stride(0),
                  prompt.data_ptr(), score.data_ptr())

    codes = [run(0)] if threads == 1 else list(thread_pool(threads).map(run, range(threads)))
    if any(codes):
        raise MemoryError("the fused kernel could not allocate its row buffer")


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def thread_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers for this process (keyed by pid: a forked child, such as a
    data-loader worker, must not wait on its parent's threads, which it does not have); shared by
    the C decisions here and ``detection.ops.roi_align``."""
    key = (os.getpid(), threads)
    with _lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="ovdense-kernel")
        return _pools[key]
