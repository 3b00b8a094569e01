"""Benchmark the last step of dense heads: the plain path and the reference vs ovdense's kernels.

    python tools/benchmarks/last_step.py --out runs/bench_kernels.csv [--device cuda]

For C ∈ {21, 150, 847} classes, outputs 512×512, 1024×1024 and 2048×1024, B ∈ {1, 8} and
``--prompts-per-class`` k ∈ {1, 2} (k > 1: synonyms, Q = k·C prompts): time and peak memory
of ``kernels.dense_classify`` (``auto``: Triton on a GPU, the torch path on a CPU, whose last
step is the fused C loop where it builds) against two references measured in the same run:

* ``plain`` (k = 1 only): what one writes without ovdense, and what most benchmark
  vocabularies need: einsum patch–text logits, ``F.interpolate`` bilinear to full size,
  softmax, max;
* ``reference`` (``kernels.reference``, the definition the kernels are tested against): the
  same plus the max over each class's prompts (a scatter over ``[B, Q, H, W]``) and the
  background threshold;

and whether the labels are identical to each. ``--eager`` also times the torch path without
the C loop (``OVDENSE_NATIVE=0``). ``--slide`` adds, per C, the sliding-window canvas
(ClearCLIP's 448/224 windows on a 512×683 image, output 512×683) against the plain full
canvas. Patch grids are those of a ViT-B/16 (``H/16 × W/16``, D = 512). Cases whose references
would need more than ``--max-reference-gb`` are skipped and say so. Labels can differ only
where the two best logits are equal to float32 rounding. Peak memory:
``torch.cuda.max_memory_allocated`` on a GPU; on a CPU, the peak resident set size above the
baseline, sampled every 2 ms. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ovdense import kernels
from ovdense.kernels.reference import dense_classify_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import PeakRss, measure, rss_bytes  # noqa: E402, F401  (tools/benchmarks/measuring.py)


def plain_path(patch: torch.Tensor, text: torch.Tensor, out_size: tuple[int, int], logit_scale: float):
    """One prompt per class, written plainly: labels and winning probabilities ``[B, H, W]``."""
    logits = torch.einsum("bdhw,qd->bqhw", patch, text)  # B, C, h, w
    logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)  # B, C, H, W
    scores, labels = torch.softmax(logits * logit_scale, dim=1).max(dim=1)
    return labels, scores


def plain_slide(windows, canvas_size, out_size, logit_scale: float):
    """The full ``[Q, H', W']`` canvas, resized, softmax, max (one prompt per class)."""
    canvas = kernels.slide_canvas_reference(windows, canvas_size)  # Q, H', W'
    up = F.interpolate(canvas[None], size=out_size, mode="bilinear", align_corners=False)[0]
    scores, labels = torch.softmax(up * logit_scale, dim=0).max(dim=0)
    return labels, scores


def slide_windows(C: int, device, seed: int = 0, canvas=(512, 683), crop=448, stride=224, p=16):
    from ovdense.heads.training_free import window_boxes

    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(C, 512, generator=g), dim=1).to(device)
    windows = []
    for y1, y2, x1, x2 in window_boxes(*canvas, crop, stride):
        patch = F.normalize(torch.randn(512, (y2 - y1) // p, (x2 - x1) // p, generator=g), dim=0).to(device)
        logits = torch.einsum("dhw,qd->qhw", patch, text)  # Q, h, w
        windows.append(kernels.Window((y1, y2, x1, x2), logits, (y2 - y1, x2 - x1)))
    return windows


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def ratio(a, b) -> str:
    return f"{a / b:>6.1f}×" if a != "" else f"{'—':>7}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 150, 847])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "2048x1024"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts-per-class", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-reference-gb", type=float, default=6.0)
    parser.add_argument("--eager", action="store_true", help="also time the torch path without the C loop")
    parser.add_argument("--slide", action="store_true", help="also time the sliding-window canvas")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_kernels.csv"))
    args = parser.parse_args(argv)

    from ovdense.kernels import native

    device = torch.device(args.device)
    fused = device.type == "cpu" and native.available()
    print(f"device {device.type}, {torch.get_num_threads()} threads, fused C loop: "
          f"{'yes' if fused else 'no (' + str(native.failure()) + ')'}; load average {load()}")
    rows = []
    print(f"{'C':>4} {'k':>1} {'H×W':>10} {'B':>2} {'plain ms':>9} {'ref ms':>9} {'ovd ms':>8} "
          f"{'vs plain':>8} {'vs ref':>7} {'eager ms':>9} {'ref MB':>8} {'ovd MB':>7}  labels")
    for C in args.classes:
        for size in args.sizes:
            H, W = (int(v) for v in size.split("x"))
            for B in args.batches:
                for k in args.prompts_per_class:
                    rows.append(run_case(C, k, H, W, B, device, args))
        if args.slide:
            rows.append(run_slide(C, device, args))
    print(f"load average {load()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


def run_case(C: int, k: int, H: int, W: int, B: int, device, args) -> dict:
    g = torch.Generator().manual_seed(0)
    Q = C * k
    patch = F.normalize(torch.randn(B, 512, H // 16, W // 16, generator=g), dim=1).to(device)
    text = F.normalize(torch.randn(Q, 512, generator=g), dim=1).to(device)
    cop = (torch.arange(Q) // k).to(device)
    row = {"device": device.type, "C": C, "prompts_per_class": k, "H": H, "W": W, "B": B}
    ours_t, ours_m, ours = measure(partial(kernels.dense_classify, patch, text, cop, (H, W), 40.0),
                                   device, args.repeats)
    row.update(ovdense_ms=1e3 * ours_t, ovdense_peak_mb=ours_m / 1e6)
    eager_t = ""
    if args.eager and device.type == "cpu":
        os.environ["OVDENSE_NATIVE"] = "0"
        try:
            eager_t = measure(partial(kernels.dense_classify, patch, text, cop, (H, W), 40.0),
                              device, args.repeats)[0]
        finally:
            del os.environ["OVDENSE_NATIVE"]
        row.update(eager_ms=1e3 * eager_t)
    need_gb = B * Q * H * W * 4 * 3 / 1e9  # logits, probabilities, class maxima
    eager = f"{1e3 * eager_t:>9.1f}" if eager_t != "" else f"{'—':>9}"
    if need_gb > args.max_reference_gb:
        row.update(note=f"references skipped: need ~{need_gb:.0f} GB")
        print(f"{C:>4} {k:>1} {H}x{W:<5} {B:>2} {'—':>9} {'—':>9} {1e3 * ours_t:>8.1f} {'—':>8} {'—':>7} "
              f"{eager} {'—':>8} {ours_m / 1e6:>7.1f}  (references need ~{need_gb:.0f} GB)")
        return row
    plain_t, labels = "", []
    if k == 1:
        plain_t, _, plain = measure(partial(plain_path, patch, text, (H, W), 40.0), device, args.repeats)
        differ = int((plain[0] != ours[0]).sum())
        row.update(plain_ms=1e3 * plain_t, plain_speedup=plain_t / ours_t, plain_label_mismatches=differ)
        labels.append("identical to plain" if differ == 0 else f"{differ} differ from plain")
    ref_t, ref_m, ref = measure(partial(dense_classify_reference, patch, text, cop, (H, W), 40.0),
                                device, args.repeats)
    differ = int((ref[0] != ours[0]).sum())
    row.update(reference_ms=1e3 * ref_t, reference_peak_mb=ref_m / 1e6, reference_speedup=ref_t / ours_t,
               reference_label_mismatches=differ,
               reference_max_score_diff=float((ref[1] - ours[1]).abs().max()))
    labels.append("identical to reference" if differ == 0 else f"{differ} differ from reference")
    plain_ms = f"{1e3 * plain_t:>9.1f}" if plain_t != "" else f"{'—':>9}"
    print(f"{C:>4} {k:>1} {H}x{W:<5} {B:>2} {plain_ms} {1e3 * ref_t:>9.1f} {1e3 * ours_t:>8.1f} "
          f"{ratio(plain_t, ours_t):>8} {ratio(ref_t, ours_t)} {eager} {ref_m / 1e6:>8.1f} "
          f"{ours_m / 1e6:>7.1f}  {', '.join(labels)}", flush=True)
    return row


def run_slide(C: int, device, args) -> dict:
    windows = slide_windows(C, device)
    canvas, out = (512, 683), (512, 683)
    cop = torch.arange(C, device=device)
    ours_t, ours_m, ours = measure(partial(kernels.slide_classify, windows, canvas, out, cop, 50.0),
                                   device, args.repeats)
    plain_t, plain_m, plain = measure(partial(plain_slide, windows, canvas, out, 50.0), device, args.repeats)
    differ = int((plain[0] != ours[0]).sum())
    print(f"{C:>4} 1 slide 512x683, 448/224 windows: plain {1e3 * plain_t:.1f} ms, "
          f"ovdense {1e3 * ours_t:.1f} ms ({plain_t / ours_t:.1f}×), "
          f"peak {plain_m / 1e6:.1f} → {ours_m / 1e6:.1f} MB, "
          f"{'labels identical' if differ == 0 else f'{differ} labels differ'}", flush=True)
    return {"device": device.type, "C": C, "prompts_per_class": 1, "H": out[0], "W": out[1], "B": 1,
            "ovdense_ms": 1e3 * ours_t, "ovdense_peak_mb": ours_m / 1e6, "plain_ms": 1e3 * plain_t,
            "plain_speedup": plain_t / ours_t, "plain_label_mismatches": differ, "note": "slide 448/224"}


if __name__ == "__main__":
    sys.exit(main())
