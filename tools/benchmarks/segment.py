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

    python tools/benchmarks/segment.py --methods naclip proxyclip --out runs/bench_methods.csv

``--methods``: each method on one generated 448×448 image with its official defaults and 21 classes (the
single template): CPU time per image (best of ``--repeats``), peak extra memory, the share of the time
spent in the VFM (ProxyCLIP: DINO ViT-B/8, random weights) and, where the official code's mirror is
here (tests/official_vfm.py finds it), the official code's time on the same resized input and weights
(mc-lan/ProxyCLIP's ``forward_slide`` + ``postprocess_result`` in fp32, one window at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
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


VFM_FOR_BENCHMARK = "dino_vitb8"


def _method_head(backbone, name: str, names: list[str]):
    from ovdense import create_head
    from ovdense.backbone.protocols import METHOD_INFO
    from ovdense.backbone.vfm import create_vfm

    options = {}
    if name in METHOD_INFO and "vfm" in METHOD_INFO[name].needs:
        options["vfm"] = create_vfm(VFM_FOR_BENCHMARK, "random", device=backbone.device)
    return create_head(name, backbone, names, templates="single", **options)


class _Timed:
    """Adds up the seconds spent in ``obj.attr`` while active."""

    def __init__(self, obj, attr: str):
        self.obj, self.attr, self.seconds = obj, attr, 0.0

    def __enter__(self):
        inner = getattr(self.obj, self.attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(self.obj, self.attr, timed)
        return self

    def __exit__(self, *exc):
        delattr(self.obj, self.attr)


def _official_proxyclip(head, rgb: np.ndarray, repeats: int, device: torch.device):
    """The official ProxyCLIP segmentor on the same weights and the same resized input: its seconds
    per image, or ``None`` when its mirror is not here."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    try:
        import pytest
        from official_vfm import PROXYCLIP_REPO, import_official_dino, import_proxyclip
    except ImportError:
        return None
    if not PROXYCLIP_REPO.is_dir():
        return None
    folder = Path(tempfile.mkdtemp(prefix="bench_proxyclip_"))
    try:
        module, fork = import_proxyclip(folder / "repo")
        dino = import_official_dino(folder / "dino").vit_base(patch_size=8, num_classes=0).eval()
    except pytest.skip.Exception:
        return None
    dino.load_state_dict(head.vfm.model.state_dict())
    clip = fork.create_model(head.backbone.name, pretrained=None, precision="fp32").eval()
    clip.load_state_dict(head.backbone.model.state_dict(), strict=False)
    names = folder / "names.txt"
    names.write_text("\n".join(head.classes) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "create_model", lambda *a, **k: clip)
        patch.setattr(torch.hub, "load", lambda *a, **k: dino)
        patch.setattr(torch.Tensor, "half", lambda self, *a, **k: self)
        patch.setattr(torch.nn.Module, "half", lambda self: self)
        crop, stride = head.window
        official = module.ProxyCLIPSegmentation(
            clip_type="openai", model_type=head.backbone.name, vfm_model="dino", name_path=str(names),
            device=device, slide_stride=stride, slide_crop=crop)
        x = head.prepare(rgb)
        meta = [dict(ori_shape=rgb.shape[:2])]
        seconds, _, _ = measure(lambda: official.postprocess_result(
            official.forward_slide(x, meta, stride, crop), None), device, repeats)
    return seconds


def method_table(backbone, methods: list[str], repeats: int, device: torch.device) -> list[dict]:
    """``--methods``: one row per method (see the module's docstring)."""
    rgb = (np.random.default_rng(1).random((448, 448, 3)) * 255).astype(np.uint8)
    names = [f"class {i}" for i in range(21)]
    rows = []
    for name in methods:
        head = _method_head(backbone, name, names)
        with torch.inference_mode():
            seconds, peak, _ = measure(partial(head.predict, rgb), device, repeats)
            vfm = getattr(head, "vfm", None)
            vfm_share = None
            if vfm is not None:
                with _Timed(vfm, "features") as timed:
                    start = time.perf_counter()
                    head.predict(rgb)
                    total = time.perf_counter() - start
                vfm_share = timed.seconds / total
            official = _official_proxyclip(head, rgb, repeats, device) if name == "proxyclip" else None
        row = {"device": device.type, "method": name, "image": "448x448", "classes": 21,
               "seconds_per_image": seconds, "peak_mb": peak / 1e6, "vfm_share": vfm_share,
               "official_seconds_per_image": official}
        rows.append(row)
        extra = f", VFM {100 * vfm_share:.0f} % of it" if vfm_share is not None else ""
        extra += f"; the official code {official:.2f} s" if official is not None else ""
        print(f"{name:>12}: {seconds:.2f} s per image, peak {peak / 1e6:.0f} MB{extra}")
    return rows


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


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
    parser.add_argument("--methods", nargs="+",
                        help="time these methods per 448² image instead (e.g. naclip proxyclip)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = create_backbone(args.model, pretrained=args.pretrained, device=args.device)
    if args.methods:
        _write_rows(args.out, method_table(backbone, args.methods, args.repeats, device))
        return 0
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
    _write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
