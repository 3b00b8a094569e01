"""Benchmark the last step of dense heads: reference vs ovdense kernels.

    python tools/benchmark_kernels.py --out runs/bench_kernels.csv [--device cuda]

For C ∈ {21, 150, 847} classes, outputs 512×512, 1024×1024 and 2048×1024 and B ∈ {1, 8}:
time and peak memory of the reference (full-resolution logits) and of ``kernels.dense_classify``
(``auto``: Triton on a GPU, the chunked torch path on a CPU), measured in the same run, and
whether the labels are identical. Patch grids are those of a ViT-B/16 (``H/16 × W/16``,
D = 512). Cases whose reference would need more than ``--max-reference-gb`` are skipped and
say so. Labels can differ only where the two best logits are equal to float32 rounding (one
pixel in 8.4 M in a measured case, top-2 gap 4e-9). Peak memory:
``torch.cuda.max_memory_allocated`` on a GPU; on a CPU, the peak resident set size above the
baseline, sampled every 2 ms.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ovdense import kernels
from ovdense.kernels.reference import dense_classify_reference


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
    """Best wall time in seconds over ``repeats`` runs, peak extra memory in bytes, the result."""
    best, peak = float("inf"), 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRss() as rss:
                start = time.perf_counter()
                result = fn()
                best = min(best, time.perf_counter() - start)
            peak = max(peak, rss.peak)
        del result
    return best, peak, fn()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 150, 847])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "2048x1024"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-reference-gb", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels.csv"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    rows = []
    print(f"{'C':>4} {'H×W':>10} {'B':>2} {'ref ms':>9} {'ovd ms':>9} {'speed-up':>8} "
          f"{'ref MB':>8} {'ovd MB':>8}  labels")
    for C in args.classes:
        for size in args.sizes:
            H, W = (int(v) for v in size.split("x"))
            for B in args.batches:
                g = torch.Generator().manual_seed(0)
                patch = F.normalize(torch.randn(B, 512, H // 16, W // 16, generator=g), dim=1).to(device)
                text = F.normalize(torch.randn(C, 512, generator=g), dim=1).to(device)
                cop = torch.arange(C, device=device)
                need_gb = B * C * H * W * 4 * 3 / 1e9  # logits, probabilities, class maxima
                row = {"device": device.type, "C": C, "H": H, "W": W, "B": B}
                args_ = (patch, text, cop, (H, W), 40.0, 0.1)
                ours_t, ours_m, ours = measure(partial(kernels.dense_classify, *args_), device, args.repeats)
                row.update(ovdense_ms=1e3 * ours_t, ovdense_peak_mb=ours_m / 1e6)
                if need_gb > args.max_reference_gb:
                    row.update(reference_ms="", reference_peak_mb="", speedup="", label_mismatches="",
                               note=f"reference skipped: needs ~{need_gb:.0f} GB")
                    print(f"{C:>4} {size:>10} {B:>2} {'—':>9} {1e3 * ours_t:>9.1f} {'—':>8} {'—':>8} "
                          f"{ours_m / 1e6:>8.1f}  (reference needs ~{need_gb:.0f} GB)")
                else:
                    ref_t, ref_m, ref = measure(partial(dense_classify_reference, *args_), device,
                                                args.repeats)
                    mismatches = int((ref[0] != ours[0]).sum())
                    equal = mismatches == 0
                    row.update(reference_ms=1e3 * ref_t, reference_peak_mb=ref_m / 1e6,
                               speedup=ref_t / ours_t, label_mismatches=mismatches, note="")
                    print(f"{C:>4} {size:>10} {B:>2} {1e3 * ref_t:>9.1f} {1e3 * ours_t:>9.1f} "
                          f"{ref_t / ours_t:>7.1f}× {ref_m / 1e6:>8.1f} {ours_m / 1e6:>8.1f}  "
                          f"{'identical' if equal else f'{mismatches} differ'}")
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
