"""Wall time and peak memory of a call, shared by the benchmarks (``last_step.py``,
``segment.py``, ``anomaly.py``, ``clipseg.py``) and ``tools/misc/gpu_check.py``.

No file in this folder is named after a package: a script's folder comes first on ``sys.path``,
and the benchmark of the kernels, once ``kernels.py``, hid the ``kernels`` package that
transformers 5 imports (and lost to it when that was imported first).
"""

from __future__ import annotations

import os
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the resident set size every 2 ms while active; ``peak`` is above the start."""

    def __enter__(self):
        self.base = self.top = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.top = max(self.top, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.top, rss_bytes()) - self.base


def measure(fn, device: torch.device, repeats: int):
    """Best wall time in seconds over ``repeats`` runs after one untimed warm-up (thread pools,
    first-touch pages), peak extra memory in bytes over all of them, the warm-up's result."""
    best, peak, result = float("inf"), 0, None
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRss() as rss:
                start = time.perf_counter()
                out = fn()
                elapsed = time.perf_counter() - start
            peak = max(peak, rss.peak)
        if i == 0:
            result = out
        else:
            best = min(best, elapsed)
        del out
    return best, peak, result
