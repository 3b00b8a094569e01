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

    python tools/benchmarks/segment.py --methods cliper clipdinoiser --out runs/bench_methods.csv

``cliper`` (class 0 named "background", as CLIPer requires) and ``clipdinoiser`` (a random head for the
backbone, written to a temporary head file) are timed the same way; their official code
(tests/official_segmenters.py) runs on the same resized input and weights, fp32 on the CPU (no official
time on another device): linsun449/cliper.code's ``Pipeline`` (``CLIPer.forward``, no refinement) and its
post-processing (``main_ovs.py:46-49``, ``cam_to_label``); wysoczanska/clip_dinoiser's model (open_clip
2.24, the head's tensors as its ``last.pt``, ovdense's text rows as its class embeddings) through the
mmseg 0.27 sliding-window eval. ``--size`` (the image's side) and ``--short-side`` (every head's short side,
windows of that side with half its stride; CLIPer keeps its single pass) shrink the run for a smoke test;
``--methods`` uses the first of ``--classes`` as the number of classes (21 by default).
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


def _method_head(backbone, name: str, names: list[str], folder: Path, short_side: int | None = None):
    """Head ``name`` with its official defaults (``short_side``: this short side and windows of it, stride
    half of it, instead); ``clipdinoiser`` gets a random head written to ``folder``."""
    from ovdense import create_head
    from ovdense.backbone.protocols import METHOD_INFO
    from ovdense.backbone.vfm import create_vfm

    options = {}
    if name in METHOD_INFO and "vfm" in METHOD_INFO[name].needs:
        options["vfm"] = create_vfm(VFM_FOR_BENCHMARK, "random", device=backbone.device)
    if name == "cliper":  # class 0 must be the background
        names = ["background", *names[1:]]
    if name == "clipdinoiser":
        from ovdense.heads.clipdinoiser import ClipDinoiserHead, save_head

        options["head_checkpoint"] = save_head(folder / "clipdinoiser-head.safetensors",
                                               ClipDinoiserHead(backbone), backbone)
    if short_side is not None:
        options["short_side"] = short_side
        if name != "cliper":
            options["window"] = (short_side, short_side // 2)
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


def _official_helpers(name: str):
    """The module ``name`` of tests/ that loads official code (``official_vfm``, ``official_segmenters``)
    and pytest (its skips), or ``None`` when either is missing."""
    import importlib

    tests = str(Path(__file__).resolve().parents[2] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        module = importlib.import_module(name)
        import pytest
    except ImportError:
        return None
    return module, pytest


def _official_proxyclip(head, rgb: np.ndarray, repeats: int, device: torch.device, folder: Path):
    """The official ProxyCLIP segmentor on the same weights and the same resized input (its code checked
    out under ``folder``): its seconds per image, or ``None`` when its mirror is not here."""
    loaded = _official_helpers("official_vfm")
    if loaded is None:
        return None
    official_vfm, pytest = loaded
    if not official_vfm.PROXYCLIP_REPO.is_dir():
        return None
    try:
        module, fork = official_vfm.import_proxyclip(folder / "repo")
        dino = official_vfm.import_official_dino(folder / "dino").vit_base(patch_size=8, num_classes=0).eval()
    except pytest.skip.Exception:
        return None
    dino.load_state_dict(head.vfm.model.state_dict())
    name = head.backbone.name
    if Path(name).is_file():  # a JSON config (as create_backbone takes it): the fork registers it by its stem
        fork.add_model_config(name)
        name = Path(name).stem
    clip = fork.create_model(name, pretrained=None, precision="fp32").eval()
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


def _official_cliper(head, rgb: np.ndarray, repeats: int, device: torch.device, folder: Path):
    """The official CLIPer ``Pipeline`` (no refinement) and its post-processing on the same weights, text
    rows and resized input: its seconds per image, or ``None`` without its mirrors or off the CPU."""
    loaded = _official_helpers("official_segmenters")
    if loaded is None or device.type != "cpu":
        return None
    official_segmenters, pytest = loaded
    try:
        official = official_segmenters.import_cliper(folder / "cliper")
    except pytest.skip.Exception:
        return None
    clip_model = official_segmenters.cliper_clip(official, head.backbone.model)
    cfg = official_segmenters.cliper_config(
        head.short_side, crop=head.window[0], select_layer=head.select_layer, thr=head.attention_threshold,
        scale=head.logit_scale, score_threshold=head.score_threshold, bkg_thre=head.bg_threshold,
        is_normalize=head.normalize_maps)
    with pytest.MonkeyPatch.context() as patch:
        pipe = official_segmenters.official_cliper(official, clip_model, cfg, patch,
                                                   build=official.pipeline.Pipeline)
    C = len(head.vocabulary) - 1
    fg, bg = head.text[:C], head.text[C:-1]  # the foreground rows, the background words' rows
    x = head.prepare(rgb)  # 1, 3, H', W' (the official preprocess)
    seconds, _, _ = measure(lambda: official_segmenters.cliper_labels(
        official, pipe, x, fg, bg, rgb.shape[:2], cfg), device, repeats)
    return seconds


def _official_clipdinoiser(head, rgb: np.ndarray, repeats: int, device: torch.device, folder: Path):
    """The official CLIP-DINOiser model on the same CLIP weights, head tensors (its ``last.pt``) and text
    rows (its class embeddings), through the mmseg 0.27 sliding-window eval on the same resized input: its
    seconds per image, or ``None`` without its mirrors or off the CPU."""
    loaded = _official_helpers("official_segmenters")
    if loaded is None or device.type != "cpu":
        return None
    official_segmenters, pytest = loaded
    try:
        off = official_segmenters.import_clip_dinoiser(folder / "clipdinoiser")
    except pytest.skip.Exception:
        return None
    clip = official_segmenters.clip_dinoiser_clip(off, head.backbone)
    state = {key: value.detach().clone() for key, value in head.head.state_dict().items()}
    with pytest.MonkeyPatch.context() as patch:
        model = official_segmenters.official_clip_dinoiser(off, clip, list(head.classes), state, patch)
    decode = model.clip_backbone.decode_head
    if decode.class_embeddings.shape == head.text.shape:  # one word per class: ovdense's text rows
        decode.class_embeddings = head.text.clone()
    model.apply_found = head.found_background
    x = head.prepare(rgb)  # 1, 3, H', W' in [0, 1]
    crop, stride = head.window if head.window[0] else (max(x.shape[-2:]),) * 2
    seconds, _, _ = measure(lambda: official_segmenters.clip_dinoiser_slide(
        model, x, crop, stride, rgb.shape[:2]), device, repeats)
    return seconds


#: the official code's seconds per image for a head: ``(head, rgb, repeats, device, folder) -> s or None``
OFFICIAL = {"proxyclip": _official_proxyclip, "cliper": _official_cliper,
            "clipdinoiser": _official_clipdinoiser}


def method_table(backbone, methods: list[str], repeats: int, device: torch.device, size: int = 448,
                 classes: int = 21, short_side: int | None = None) -> list[dict]:
    """``--methods``: one row per method on one ``size``² image with ``classes`` classes (see the module's
    docstring; ``short_side`` overrides every head's, for a quick run)."""
    import shutil
    import tempfile

    rgb = (np.random.default_rng(1).random((size, size, 3)) * 255).astype(np.uint8)
    names = [f"class {i}" for i in range(classes)]
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    try:
        for name in methods:
            rows.append(_method_row(backbone, name, names, rgb, repeats, device, folder / name, short_side))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _method_row(backbone, name: str, names: list[str], rgb: np.ndarray, repeats: int, device: torch.device,
                folder: Path, short_side: int | None) -> dict:
    folder.mkdir(parents=True)
    head = _method_head(backbone, name, names, folder, short_side)
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
        official = OFFICIAL[name](head, rgb, repeats, device, folder) if name in OFFICIAL else None
    row = {"device": device.type, "method": name, "image": f"{rgb.shape[0]}x{rgb.shape[1]}",
           "classes": len(names), "seconds_per_image": seconds, "peak_mb": peak / 1e6,
           "vfm_share": vfm_share, "official_seconds_per_image": official}
    extra = f", VFM {100 * vfm_share:.0f} % of it" if vfm_share is not None else ""
    extra += f"; the official code {official:.2f} s" if official is not None else ""
    print(f"{name:>12}: {seconds:.2f} s per image, peak {peak / 1e6:.0f} MB{extra}")
    return row


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def _methods_apart(argv: list[str], args) -> int:
    """``--methods`` with several: each method in a process of its own (this script with that one
    method), so that its peak memory is its own and not hidden by what an earlier method freed; the
    rows are gathered into ``--out``."""
    import subprocess
    import tempfile

    rest, skip = [], False
    for item in argv:  # drop --methods and --out with their values
        if skip and not item.startswith("--"):
            continue
        skip = item in ("--methods", "--out")
        if not skip:
            rest.append(item)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as folder:
        for index, name in enumerate(args.methods):
            out = Path(folder) / f"{index}.csv"
            done = subprocess.run([sys.executable, __file__, *rest, "--methods", name, "--out", str(out)])
            if done.returncode != 0:
                return done.returncode
            with open(out, newline="") as f:
                rows += list(csv.DictReader(f))
    _write_rows(args.out, rows)
    return 0


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
                        help="time these methods per 448² image instead (e.g. naclip proxyclip cliper)")
    parser.add_argument("--size", type=int, default=448, help="--methods: the image's side in pixels")
    parser.add_argument("--short-side", type=int, default=None,
                        help="--methods: every head's short side (and windows of it) instead of its own")
    args = parser.parse_args(argv)
    if args.methods and len(args.methods) > 1:
        return _methods_apart(list(argv) if argv is not None else sys.argv[1:], args)

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = create_backbone(args.model, pretrained=args.pretrained, device=args.device)
    if args.methods:
        _write_rows(args.out, method_table(backbone, args.methods, args.repeats, device, args.size,
                                           args.classes[0], args.short_side))
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
