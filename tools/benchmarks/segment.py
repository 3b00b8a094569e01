"""End-to-end benchmark: the Segmenter against the official protocol written plainly.

    python tools/benchmarks/segment.py --out runs/bench_segment.csv [--device cuda]

ViT-B/16 (random weights unless ``--pretrained``), ClearCLIP's protocol (short side 448,
windows 448/224), ``--images`` generated images of 512×683, C ∈ {21, 150, 847} classes with
the single template. The baseline is the official repos' loop, written here the
straightforward way: one window at a time through the backbone (its blocks as open_clip runs
them), its logits upsampled to the window and added to a full-resolution ``[C, H', W']``
canvas, the canvas resized to the image, softmax, argmax. The Segmenter batches the windows and
classifies through the kernels. Both are timed in the same run, alternately, best of
``--repeats`` each (text encoding excluded, after a warm-up of both); labels must be identical,
and where they are not, the gap between the two best classes at those pixels is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ovdense import Segmenter, create_backbone
from ovdense.backbone import dense
from ovdense.heads.training_free import rescale_size, window_boxes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measuring import measure  # noqa: E402  (tools/benchmarks/measuring.py)


@contextlib.contextmanager
def open_clip_blocks():
    """The tower's unchanged blocks run as open_clip runs them (``nn.MultiheadAttention``), as in the
    official code, instead of ovdense's ``dense.run_block`` (the same function through SDPA)."""
    fast = dense.run_block
    dense.run_block = lambda block, x, attn_mask=None: block(x, attn_mask=attn_mask)
    try:
        yield
    finally:
        dense.run_block = fast


def official_logits(segmenter: Segmenter, rgb: np.ndarray) -> torch.Tensor:
    """The official ``slide_inference``, one window at a time, the tower's blocks as open_clip runs
    them: scaled logits ``[1, C, H, W]``."""
    import cv2

    backbone = segmenter.backbone
    H, W = rgb.shape[:2]
    h, w = rescale_size(H, W, segmenter.short_side)
    x = backbone.to_tensor(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR))
    crop, stride = segmenter.window
    canvas = torch.zeros(1, segmenter.text.shape[0], h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    for y1, y2, x1, x2 in window_boxes(h, w, crop, stride):
        window = x[:, :, y1:y2, x1:x2]
        with open_clip_blocks():
            feats = backbone.encode_dense(window, segmenter.method)
        logits = torch.einsum("bdhw,qd->bqhw", feats.float(), segmenter.text.float())
        canvas[:, :, y1:y2, x1:x2] += F.interpolate(logits, size=window.shape[-2:], mode="bilinear")
        count[:, :, y1:y2, x1:x2] += 1
    logits = F.interpolate(canvas / count, size=(H, W), mode="bilinear")
    return logits * segmenter.logit_scale


def official_loop(segmenter: Segmenter, rgb: np.ndarray) -> torch.Tensor:
    """The official protocol: softmax and argmax of ``official_logits`` → labels ``[H, W]``."""
    probs = torch.softmax(official_logits(segmenter, rgb), dim=1)
    return probs.argmax(dim=1)[0]


def mismatch_gaps(segmenter: Segmenter, images: list[np.ndarray], base: list, ours: list) -> list[float]:
    """For every pixel whose labels differ, the gap between the official run's two best scaled
    logits there (recomputed outside the timing): near zero means a tie within rounding."""
    gaps = []
    for image, a, b in zip(images, base, ours):
        differ = a.cpu().numpy() != b.labels
        if differ.any():
            top2 = official_logits(segmenter, image)[0].topk(2, dim=0).values  # 2, H, W
            gaps += (top2[0] - top2[1])[torch.from_numpy(differ)].tolist()
    return gaps


def run_official(segmenter: Segmenter, images: list[np.ndarray]) -> list[torch.Tensor]:
    return [official_loop(segmenter, image) for image in images]


def run_ovdense(segmenter: Segmenter, images: list[np.ndarray]) -> list:
    return [segmenter.predict(image) for image in images]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 150, 847])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed runs")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_segment.csv"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = create_backbone(args.model, pretrained=args.pretrained, device=args.device)
    rng = np.random.default_rng(0)
    images = [(rng.random((512, 683, 3)) * 255).astype(np.uint8) for _ in range(args.images)]
    rows = []
    with torch.inference_mode():  # warm-up outside the timing: first calls allocate and initialise
        warm = Segmenter(backbone, "clearclip", ["a", "b"], templates="single")
        official_loop(warm, images[0])
        warm.predict(images[0])
    for C in args.classes:
        names = [f"class {i}" for i in range(C)]
        segmenter = Segmenter(backbone, "clearclip", names, templates="single")
        with torch.inference_mode():
            base_t = ours_t = float("inf")
            base_m = ours_m = 0
            for _ in range(args.repeats):  # alternate, so that a slow spell of the machine hits both
                t, m, base = measure(partial(run_official, segmenter, images), device, 1)
                base_t, base_m = min(base_t, t), max(base_m, m)
                t, m, ours = measure(partial(run_ovdense, segmenter, images), device, 1)
                ours_t, ours_m = min(ours_t, t), max(ours_m, m)
            gaps = mismatch_gaps(segmenter, images, base, ours)
        row = {"device": device.type, "C": C, "images": len(images),
               "official_img_per_s": len(images) / base_t, "ovdense_img_per_s": len(images) / ours_t,
               "speedup": base_t / ours_t, "official_peak_mb": base_m / 1e6,
               "ovdense_peak_mb": ours_m / 1e6, "pixels_differing": len(gaps),
               "max_gap_where_differing": max(gaps, default=0.0)}
        rows.append(row)
        agreement = ("identical" if not gaps else f"DIFFER at {len(gaps)} pixels, where the two best "
                     f"scaled logits are at most {row['max_gap_where_differing']:.2e} apart")
        print(f"C={C:>4}: official {row['official_img_per_s']:.2f} img/s, ovdense "
              f"{row['ovdense_img_per_s']:.2f} img/s, {row['speedup']:.2f}×; peak "
              f"{row['official_peak_mb']:.0f} MB vs {row['ovdense_peak_mb']:.0f} MB; labels {agreement}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
