"""Every GPU figure of the project in one prepared run: one process, seeded, random weights.

    python tools/misc/gpu_check.py --out DIR [--smoke] [--device cuda|cpu] [--parts ...] [--budget-s N]

Writes ``DIR/gpu_report.md`` and one CSV per part (``DIR/<part>.csv``: seven files, so that with
the log the eight files the device tool brings back from ``$OUT`` hold everything), rewritten
after every part, so a run stopped early keeps what it measured. Progress is printed as it goes.
Nothing is downloaded: every model has random weights (``torch.manual_seed(--seed)`` before each
is built, so the fp32, fp16 and bf16 copies of one model share their weights); random weights
make absolute scores meaningless, agreement and speed are what is measured.

Parts (``--parts`` takes names or numbers; each runs under its own time budget, checked between
repetitions and cases; when it is spent the part ends with a ``budget exhausted after …`` row,
and a part that raises is recorded as failed with its error while the next part still runs):

1. ``environment`` — GPU name, driver, CUDA capability, torch/Triton/open_clip versions, whether
   ``torch.cuda.max_memory_allocated`` works after a reset, which optional packages import.
2. ``kernels`` — ``kernels.dense_classify(kernel="triton")`` (``TRITON_INTERPRET=0`` on a GPU;
   the interpreter on a CPU) against the torch reference (``dense_classify_reference``: the
   naive einsum + interpolate + softmax + argmax) at C = 21/150/847 and 512², 1024², 2048×1024
   (H×W as in ``tools/benchmarks/last_step.py``; ViT-B/16 grids, D = 512, ClearCLIP's logit scale,
   no background threshold so that the labels are real argmaxes): labels identical (where not,
   the gap of the two best reference logits there), scores within 1e-5, median time and peak
   memory of both. Targets at C = 847, 2048×1024: ≥ 5× faster, ≤ 1/10 of the memory.
3. ``segment`` — ViT-B/16, ClearCLIP's protocol (short side 448, windows 448/224), C = 150,
   images of 512×683: the official one-window-at-a-time loop (``tools/benchmarks/segment.py``)
   against ``Segmenter`` with batched windows in fp32 (labels identical; target ≥ 3×), then the
   Segmenter in fp16 and bf16 (``create_backbone(precision=...)``): images per second and the
   fraction of pixels whose label agrees with fp32 (target ≥ 99.5 %). Goal ≥ 30 images/s.
4. ``winclip`` — WinCLIP on ``ViT-B-16-plus-240`` at 240², batches of 16: ovdense fp32 and bf16
   and anomalib 2.7's ``WinClipModel`` fp32 on the same weights (``tools/benchmarks/anomaly.py``)
   when anomalib imports, else ovdense alone with the reason. Agreement: the minimum Pearson r
   of the maps, ovdense vs anomalib (same prompts) and bf16 vs fp32 (target ≥ 0.999); speed-ups
   (target ≥ 3× in bf16 over anomalib).
5. ``sam_clip`` — SAM + CLIP at M = 100 masks: ovdense's one dense pass against crop-and-encode
   per mask (``tools/benchmarks/sam_clip.py``), and segment-anything's automatic mask generator
   (random ``vit_b``, 16² points) timed once, when segment-anything imports.
6. ``heads`` — SAN inference per 640 px image when ``ovdense.heads.san`` imports; F-ViT at 640²
   (``PlainFViT``, CLIM's OV-COCO head layout, random weights): the frozen backbone against the head
   on its features (goal: the head under the backbone's time); one tower block, open_clip's
   ``nn.MultiheadAttention`` against ``dense.run_block`` (SDPA) at 224², 448², 1024²: times and the
   largest difference.

Timing: CUDA events around each call (a synchronize on the CPU), after warm-up runs, the median
of the repeats. Peak memory: ``torch.cuda.max_memory_allocated`` above the baseline after a
reset; on a CPU the peak resident set size above the baseline (``PeakRss`` of
``tools/benchmarks/measuring.py``).
On a GPU TF32 is switched off, so fp32 means fp32 (the environment part says so).

``--smoke`` runs every part on the CPU at tiny sizes (a tiny 12-block ViT as in
``tests/conftest.py`` instead of the real models, small images, a few classes, a tiny SAM) in
well under a minute on an idle machine, through the same code paths; its figures mean nothing,
and each part's budget is 600 s there, so that a loaded CI machine does not cut a part short.
``tests/test_gpu_check.py`` runs it.

**On a GPU machine** with ovdense's dependencies installed::

    python tools/misc/gpu_check.py --out runs/gpu_check 2>&1 | tee runs/gpu_check.log

**On this workplace's device machine** (Python 3.12 with torch, Triton, timm, lightning,
torchmetrics, scikit-image, opencv; no network): carry the missing packages as wheels in the
ignored ``.whl/`` (``.gitignore`` lists it): 13 files, 10.3 MiB, which with the working tree
(about 21 MB) stays well inside the 64 MiB that travels. Here, once, in the repository's root::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform any -d .whl \\
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 segment-anything==1.0 \\
        anomalib==2.7.0 jsonargparse==4.46.0 docstring-parser==0.18.0 omegaconf==2.4.0 \\
        kornia==0.9.0 kornia_rs==0.2.0 platformdirs==4.14.9 rich-argparse==1.8.0
    python3 -m pip wheel --no-deps -w .whl FrEIA==0.2   # sdist only on PyPI: a pure-Python wheel

(open_clip needs ftfy → wcwidth beyond the image; anomalib's ``WinClipModel`` imports its whole
model zoo, which needs the rest; omegaconf 2.4 vendors its antlr runtime. The biggest wheel is
kornia_rs, 5.3 MB.) Then one ``run`` call with ``carry: [".whl"]`` and ``timeout_s: 480`` (the
default part budgets add up to 400 s), and ``give_back`` after it::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl || exit; export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1; \\
    set -o pipefail; python3 tools/misc/gpu_check.py --out $OUT 2>&1 | tee $OUT/gpu_check.log

The report's tables and the log come back under the reply's ``files_at``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The benchmark scripts of tools/benchmarks/ are imported from there. ovdense (and so open_clip,
# which imports Triton) is imported only inside functions: Triton reads TRITON_INTERPRET when it is
# first imported, and ``main`` sets it for the device first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

PARTS = ("environment", "kernels", "segment", "winclip", "sam_clip", "heads")
BUDGETS = {"environment": 20.0, "kernels": 90.0, "segment": 110.0, "winclip": 70.0, "sam_clip": 55.0,
           "heads": 55.0}  # seconds; 400 in all, inside a 480 s device call
SMOKE_BUDGET_S = 600.0  # per part: the smoke run checks code paths; a loaded CI machine must not cut them
TITLES = {
    "environment": "Environment",
    "kernels": "Triton kernel vs the naive interpolate + softmax + argmax",
    "segment": "End to end: ClearCLIP protocol, official loop vs Segmenter (fp32, fp16, bf16)",
    "winclip": "WinCLIP: ovdense fp32/bf16 vs anomalib's WinClipModel",
    "sam_clip": "SAM + CLIP: one dense pass vs crop-and-encode",
    "heads": "Trained heads (SAN, F-ViT's head against its backbone) and one tower block (MHA vs SDPA)",
}
TARGETS = {
    "kernels": "labels identical, scores within 1e-5; at C = 847, 2048×1024: ≥ 5× faster and ≤ 1/10 "
               "of the naive path's peak memory",
    "segment": "fp32 labels identical to the official loop and ≥ 3× its speed; fp16/bf16 ≥ 99.5 % of "
               "pixels agreeing with fp32; ≥ 30 images/s at 512×683",
    "winclip": "Pearson r ≥ 0.999 (ovdense vs anomalib, bf16 vs fp32); bf16 ≥ 3× anomalib's speed",
    "sam_clip": "(no target: the speed-up and the CLIP passes are the figures)",
    "heads": "F-ViT's head (plain torch) under its backbone's time at 640²; SDPA blocks equal to "
             "open_clip's within 1e-5 and not slower",
}
TINY_VIT = {  # tests/conftest.py's tiny CLIP: 12 blocks so every method's layer choices exist
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
TINY = "tiny"  # stands for TINY_VIT in a Plan


@dataclass(frozen=True)
class Plan:
    """The sizes of one run. ``FULL`` is the issue's; ``SMOKE`` the same paths, tiny."""

    warmup: int
    repeats: int
    kernel_classes: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, int], ...]  # H, W
    kernel_dim: int
    kernel_patch: int  # the patch grid is H/p × W/p
    segment_model: str
    segment_image: tuple[int, int]  # H, W
    segment_images: int
    segment_classes: int
    segment_short_side: int | None  # None: the method's protocol (448)
    segment_window: tuple[int, int] | None  # None: the method's protocol (448, 224)
    winclip_model: str
    winclip_batch: int
    sam_model: str
    sam_size: int
    sam_masks: int
    sam_classes: int
    sam_points: int
    sam_short_side: int | None  # None: the method's protocol (448)
    san_size: int


FULL = Plan(
    warmup=2, repeats=10,
    kernel_classes=(21, 150, 847), kernel_sizes=((512, 512), (1024, 1024), (2048, 1024)), kernel_dim=512,
    kernel_patch=16,
    segment_model="ViT-B-16", segment_image=(512, 683), segment_images=8, segment_classes=150,
    segment_short_side=None, segment_window=None,
    winclip_model="ViT-B-16-plus-240", winclip_batch=16,
    sam_model="ViT-B-16", sam_size=512, sam_masks=100, sam_classes=20, sam_points=16,
    sam_short_side=None, san_size=640,
)
SMOKE = Plan(
    warmup=0, repeats=1,  # Triton's interpreter runs one program at a time: few, small calls
    kernel_classes=(3, 40), kernel_sizes=((16, 24),), kernel_dim=32, kernel_patch=8,
    segment_model=TINY, segment_image=(40, 56), segment_images=2, segment_classes=5,
    segment_short_side=32, segment_window=(32, 16),
    winclip_model=TINY, winclip_batch=2,
    sam_model=TINY, sam_size=96, sam_masks=4, sam_classes=5, sam_points=2,
    sam_short_side=96, san_size=64,
)


class BudgetExhausted(Exception):
    """Raised by ``PartRun.check`` to end a part whose time is spent (not a failure)."""


class PartRun:
    """One part's rows and its time budget."""

    def __init__(self, name: str, budget_s: float):
        self.name = name
        self.budget_s = budget_s
        self.rows: list[dict] = []
        self.status = "ok"
        self.error = ""
        self.start = time.perf_counter()
        self.seconds = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.elapsed() > self.budget_s

    def add(self, case: str, status: str = "ok", **values) -> dict:
        row = {"case": case, "status": status, **values}
        self.rows.append(row)
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items() if v != "")
        print(f"[{self.name} {self.elapsed():6.1f} s] {case}: {status}" + (f"; {shown}" if shown else ""),
              flush=True)
        return row

    def check(self, next_case: str) -> None:
        """Between cases: end the part with a ``budget exhausted`` row if its time is spent."""
        if self.exhausted():
            self.status = f"budget exhausted after {self.elapsed():.1f} s of {self.budget_s:.0f} s"
            self.add(next_case, self.status, note="this case and the part's later ones were not run")
            raise BudgetExhausted


class Run:
    """What every part shares: the plan, the device, the seed, a private cache folder."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.plan = SMOKE if args.smoke else FULL
        self.device = torch.device(args.device)
        self.seed = args.seed
        self.workdir = workdir
        self.tiny_config = workdir / "tiny-vit.json"
        self.tiny_config.write_text(json.dumps(TINY_VIT))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def backbone(self, model: str, precision: str = "fp32"):
        """A random-weight backbone; the seed is reset first, so precisions share weights."""
        from ovdense import create_backbone

        torch.manual_seed(self.seed)
        name = str(self.tiny_config) if model == TINY else model
        return create_backbone(name, pretrained=None, device=self.device, precision=precision,
                               cache_dir=self.workdir / "cache")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object], part: PartRun) -> tuple[float, int]:
        """Median seconds of ``fn`` over ``plan.repeats`` runs after ``plan.warmup`` runs, and
        the runs made: fewer when the part's budget is spent (at least one)."""
        for _ in range(self.plan.warmup):
            fn()
        times = []
        for _ in range(self.plan.repeats):
            if times and part.exhausted():
                break
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start_s = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start_s)
        return statistics.median(times), len(times)

    def peak(self, fn: Callable[[], object]) -> float:
        """Peak memory of one run of ``fn`` above the baseline, in MB."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 1e6
        from measuring import PeakRss

        with PeakRss() as rss:
            fn()
        return rss.peak / 1e6

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _verdict(ok: bool, smoke: bool) -> str:
    if smoke:
        return "n/a (smoke)"
    return "meets" if ok else "MISSES"


# --------------------------------------------------------------------------------------------
# 1. environment


def part_environment(run: Run, part: PartRun) -> None:
    import triton  # noqa: F401  (the kernels need it; a missing Triton is this part's failure)

    def version(module: str) -> str:
        try:
            return getattr(__import__(module), "__version__", "imported")
        except Exception as e:  # an optional package: why it does not import is the figure
            return f"does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"

    part.add("python", value=platform.python_version())
    part.add("torch", value=torch.__version__)
    part.add("torch CUDA", value=str(torch.version.cuda))
    for module in ("triton", "open_clip", "numpy", "cv2", "timm", "segment_anything", "anomalib"):
        part.add(module, value=version(module))
    part.add("TRITON_INTERPRET", value=os.environ.get("TRITON_INTERPRET", ""))
    part.add("device", value=str(run.device))
    part.add("CPUs", value=f"{os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    part.add("git commit", value=_git_commit())
    if not run.cuda:
        part.add("GPU", value="none: this run is on the CPU")
        part.add("peak memory API", value="n/a on the CPU (peak RSS sampled instead)")
        return
    props = torch.cuda.get_device_properties(run.device)
    part.add("GPU", value=props.name)
    part.add("GPU memory", value=f"{props.total_memory / 2**30:.1f} GiB")
    part.add("CUDA capability", value=f"{props.major}.{props.minor}")
    part.add("driver", value=_driver_version())
    part.add("TF32", value=f"matmul {torch.backends.cuda.matmul.allow_tf32}, "
                           f"cudnn {torch.backends.cudnn.allow_tf32}")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.max_memory_allocated()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=run.device)
    grown = torch.cuda.max_memory_allocated() - base
    del block
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    after_reset = torch.cuda.max_memory_allocated()
    works = grown >= 64 * 2**20 and after_reset < base + 64 * 2**20
    part.add("peak memory API", "ok" if works else "failed",
             value=f"64 MiB allocation seen as {grown / 2**20:.1f} MiB; "
                   f"{after_reset / 2**20:.1f} MiB after reset")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown (no git here)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here)"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else f"unknown ({out.stderr.strip()})"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"


# --------------------------------------------------------------------------------------------
# 2. kernels


def part_kernels(run: Run, part: PartRun) -> None:
    from ovdense import kernels
    from ovdense.backbone.dense import METHODS
    from ovdense.kernels.reference import dense_classify_reference

    plan, device = run.plan, run.device
    scale = METHODS["clearclip"].protocol.logit_scale
    for C in plan.kernel_classes:
        for H, W in plan.kernel_sizes:
            case = f"C={C} {H}x{W}"
            part.check(case)
            g = torch.Generator().manual_seed(run.seed)
            grid = (H // plan.kernel_patch, W // plan.kernel_patch)
            patch = F.normalize(torch.randn(1, plan.kernel_dim, *grid, generator=g), dim=1)
            text = F.normalize(torch.randn(C, plan.kernel_dim, generator=g), dim=1)
            patch, text = patch.to(device), text.to(device)  # 1, D, h, w; C, D
            classes = torch.arange(C, device=device)
            args = (patch, text, classes, (H, W), scale, None)
            triton_path = partial(kernels.dense_classify, *args, kernel="triton")
            naive = partial(dense_classify_reference, *args)
            labels, scores = triton_path()
            ref_labels, ref_scores = naive()
            differ = labels != ref_labels  # 1, H, W
            mismatches = int(differ.sum())
            gap = _top2_gap(patch, text, (H, W), differ) if mismatches else 0.0
            score_diff = float((scores - ref_scores).abs().max())
            del labels, scores, ref_labels, ref_scores, differ
            run.release()
            naive_s, n_naive = run.timed(naive, part)
            triton_s, n_triton = run.timed(triton_path, part)
            naive_mb, triton_mb = run.peak(naive), run.peak(triton_path)
            speedup, memory_ratio = naive_s / triton_s, triton_mb / max(naive_mb, 1e-9)
            target = ""
            if (C, H, W) == (847, 2048, 1024) or run.args.smoke and (C, (H, W)) == (
                    plan.kernel_classes[-1], plan.kernel_sizes[-1]):
                target = _verdict(speedup >= 5 and memory_ratio <= 0.1, run.args.smoke)
            part.add(case, C=C, H=H, W=W, labels_identical=mismatches == 0, label_mismatches=mismatches,
                     max_top2_gap_where_differing=gap, score_max_diff=score_diff,
                     scores_within_1e_5=score_diff <= 1e-5, naive_ms=1e3 * naive_s, triton_ms=1e3 * triton_s,
                     speedup=speedup, naive_peak_mb=naive_mb, triton_peak_mb=triton_mb,
                     memory_ratio=memory_ratio, repeats=min(n_naive, n_triton), target_5x_and_tenth=target)
            run.release()


def _top2_gap(patch: torch.Tensor, text: torch.Tensor, size: tuple[int, int], differ: torch.Tensor) -> float:
    """The largest gap between the two best full-resolution reference logits (cosines, before
    the scale) at the pixels whose labels differ: near zero means a tie within rounding."""
    logits = torch.einsum("bdhw,qd->bqhw", patch.float(), text.float())  # 1, C, h, w
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # 1, C, H, W
    top2 = logits[0].topk(2, dim=0).values  # 2, H, W
    return float((top2[0] - top2[1])[differ[0]].max())


# --------------------------------------------------------------------------------------------
# 3. segment


def part_segment(run: Run, part: PartRun) -> None:
    from segment import mismatch_gaps, run_official, run_ovdense

    from ovdense import Segmenter

    plan = run.plan
    rng = np.random.default_rng(run.seed)
    H, W = plan.segment_image
    images = [(rng.random((H, W, 3)) * 255).astype(np.uint8) for _ in range(plan.segment_images)]
    names = [f"class {i}" for i in range(plan.segment_classes)]

    def segmenter(backbone):
        return Segmenter(backbone, "clearclip", names, templates="single", short_side=plan.segment_short_side,
                         window=plan.segment_window)

    fp32 = segmenter(run.backbone(plan.segment_model))
    size = f"{len(images)} images {H}x{W}, C={len(names)}, short side {fp32.short_side}, window {fp32.window}"
    print(f"[segment] {plan.segment_model}, {size}", flush=True)
    with torch.inference_mode():
        official = partial(run_official, fp32, images)
        ours = partial(run_ovdense, fp32, images)
        base, mine = official(), ours()
        gaps = mismatch_gaps(fp32, images, base, mine)
        official_s, n_official = run.timed(official, part)
        ours_s, n_ours = run.timed(ours, part)
        official_mb, ours_mb = run.peak(official), run.peak(ours)
    speedup = official_s / ours_s
    part.add("official loop fp32", model=plan.segment_model, images=len(images),
             images_per_s=len(images) / official_s, peak_mb=official_mb, repeats=n_official)
    best_rate = len(images) / ours_s
    part.add("Segmenter fp32 (batched windows)", model=plan.segment_model, images=len(images),
             images_per_s=best_rate, peak_mb=ours_mb, repeats=n_ours, speedup_vs_official=speedup,
             labels_identical=not gaps, pixels_differing=len(gaps),
             max_top2_gap_where_differing=max(gaps, default=0.0),
             target=_verdict(not gaps and speedup >= 3, run.args.smoke))
    reference = [result.labels for result in mine]
    del fp32, official, ours, base, mine
    run.release()
    for precision in ("fp16", "bf16"):
        part.check(f"Segmenter {precision}")
        low = segmenter(run.backbone(plan.segment_model, precision))
        with torch.inference_mode():
            ours = partial(run_ovdense, low, images)
            results = ours()
            agree = float(np.mean([(r.labels == ref).mean() for r, ref in zip(results, reference)]))
            low_s, n_low = run.timed(ours, part)
            low_mb = run.peak(ours)
        best_rate = max(best_rate, len(images) / low_s)
        part.add(f"Segmenter {precision}", model=plan.segment_model, images=len(images),
                 images_per_s=len(images) / low_s, peak_mb=low_mb, repeats=n_low,
                 speedup_vs_official=official_s / low_s, pixels_agreeing_with_fp32=agree,
                 target=_verdict(agree >= 0.995, run.args.smoke))
        del low, ours, results
        run.release()
    part.add("best images/s (goal ≥ 30 at 512×683)", images_per_s=best_rate,
             target=_verdict(best_rate >= 30, run.args.smoke))


# --------------------------------------------------------------------------------------------
# 4. winclip


def part_winclip(run: Run, part: PartRun) -> None:
    from anomaly import OBJECT, agreement, anomalib_winclip, scenes
    from anomaly import run_anomalib as anomalib_forward
    from anomaly import run_ovdense as winclip_forward

    from ovdense.anomaly.winclip import WinClip

    plan = run.plan
    backbone = run.backbone(plan.winclip_model)
    paper = WinClip(backbone, OBJECT)  # ovdense's default prompts: what is timed
    same_prompts = WinClip(backbone, OBJECT, prompt_set="anomalib")  # for agreement with anomalib
    x = paper.prepare(scenes(plan.winclip_batch, run.seed, defect_rate=0.75))  # B, 3, H, W
    B = x.shape[0]
    try:
        theirs, reason = anomalib_winclip(backbone, OBJECT), ""
    except Exception as e:  # anomalib is optional: why it is missing goes into the report
        theirs, reason = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with torch.inference_mode():
        fp32_out = winclip_forward(paper, x)
        fp32_s, n = run.timed(partial(winclip_forward, paper, x), part)
        fp32_mb = run.peak(partial(winclip_forward, paper, x))
    anomalib_s = None
    if theirs is None:
        part.add("anomalib WinClipModel fp32", "skipped", note=f"anomalib does not import ({reason})")
    else:
        with torch.inference_mode():
            figures = agreement(winclip_forward(same_prompts, x), anomalib_forward(theirs, x))
            anomalib_s, n_a = run.timed(partial(anomalib_forward, theirs, x), part)
            anomalib_mb = run.peak(partial(anomalib_forward, theirs, x))
        part.add("anomalib WinClipModel fp32", model=plan.winclip_model, batch=B, images_per_s=B / anomalib_s,
                 peak_mb=anomalib_mb, repeats=n_a, pearson_min_vs_ovdense=figures["pearson_min"],
                 score_max_diff=figures["score_max_diff"],
                 target=_verdict(figures["pearson_min"] >= 0.999, run.args.smoke))
    part.add("ovdense WinClip fp32", model=plan.winclip_model, batch=B, images_per_s=B / fp32_s,
             peak_mb=fp32_mb, repeats=n, speedup_vs_anomalib=anomalib_s / fp32_s if anomalib_s else "")
    del same_prompts
    part.check("ovdense WinClip bf16")
    low = WinClip(run.backbone(plan.winclip_model, "bf16"), OBJECT)
    with torch.inference_mode():
        figures = agreement(winclip_forward(low, x), fp32_out)
        bf16_s, n = run.timed(partial(winclip_forward, low, x), part)
        bf16_mb = run.peak(partial(winclip_forward, low, x))
    speedup = anomalib_s / bf16_s if anomalib_s else ""
    ok = figures["pearson_min"] >= 0.999 and (anomalib_s is None or speedup >= 3)
    part.add("ovdense WinClip bf16", model=plan.winclip_model, batch=B, images_per_s=B / bf16_s,
             peak_mb=bf16_mb, repeats=n, speedup_vs_anomalib=speedup,
             pearson_min_vs_fp32=figures["pearson_min"], target=_verdict(ok, run.args.smoke))


# --------------------------------------------------------------------------------------------
# 5. sam_clip


def part_sam_clip(run: Run, part: PartRun) -> None:
    from sam_clip import PassCounter, crop_and_encode, one_pass, random_masks

    from ovdense.data.synthetic import SceneConfig, colour_shape_classes, render_scene
    from ovdense.heads.sam_clip import SamClipSegmenter

    plan = run.plan
    rng = np.random.default_rng(run.seed)
    backbone = run.backbone(plan.sam_model)
    counter = PassCounter(backbone)
    rgb = render_scene(rng, SceneConfig(size=(plan.sam_size, plan.sam_size), objects=(3, 6))).image
    classes = colour_shape_classes()[: plan.sam_classes]
    segmenter = SamClipSegmenter(backbone, None, classes, templates="single", short_side=plan.sam_short_side)
    masks = random_masks(plan.sam_masks, rgb.shape[:2], rng)  # M, H, W
    M = len(masks)
    recipe = partial(crop_and_encode, backbone, rgb, masks, list(segmenter.vocabulary.prompts),
                     segmenter.logit_scale)
    ours = partial(one_pass, segmenter, rgb, masks)
    for name, fn in (("crop-and-encode per mask", recipe), ("ovdense one pass", ours)):
        part.check(name)
        before = counter.count
        fn()
        passes = counter.count - before
        seconds, n = run.timed(fn, part)
        part.add(name, model=plan.sam_model, image=f"{plan.sam_size}x{plan.sam_size}", masks=M,
                 clip_passes=passes, seconds=seconds, repeats=n)
    part.rows[-1]["speedup_vs_recipe"] = part.rows[-2]["seconds"] / part.rows[-1]["seconds"]
    print(f"[sam_clip] one pass is {part.rows[-1]['speedup_vs_recipe']:.1f}× crop-and-encode", flush=True)
    part.check("SAM automatic mask generator")
    try:
        import segment_anything
    except ImportError as e:
        part.add("SAM automatic mask generator", "skipped", note=f"segment_anything does not import ({e})")
        return
    if run.args.smoke:
        sam, model = _tiny_sam(), "tiny SAM (256 px, width 32)"
    else:
        sam, model = segment_anything.sam_model_registry["vit_b"](checkpoint=None), "vit_b"
    sam = sam.to(run.device).eval()
    generator = segment_anything.SamAutomaticMaskGenerator(sam, points_per_side=plan.sam_points)
    with torch.inference_mode():
        if plan.warmup:
            generator.generate(rgb)
        run.sync()
        start = time.perf_counter()
        kept = generator.generate(rgb)
        run.sync()
        seconds = time.perf_counter() - start
    part.add("SAM automatic mask generator", model=f"{model}, random weights", points=plan.sam_points ** 2,
             seconds=seconds, masks_kept=len(kept),
             note="random weights: few masks pass its filters; the classification above used drawn masks")


def _tiny_sam() -> torch.nn.Module:
    """segment-anything's ``Sam`` with every part shrunk (256 px input, width 32, two blocks;
    its ``_build_sam`` fixes 1024 px and width 256): the smoke run's SAM, same code path."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size, patch, dim = 256, 16, 32
    encoder = ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                              out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    prompts = PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                            input_image_size=(size, size), mask_in_chans=8)
    transformer = TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, transformer=transformer,
                          iou_head_depth=2, iou_head_hidden_dim=dim)
    return Sam(image_encoder=encoder, prompt_encoder=prompts, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


# --------------------------------------------------------------------------------------------
# 6. heads


def part_heads(run: Run, part: PartRun) -> None:
    try:
        import ovdense.heads.san as san
    except ImportError as e:
        part.add("SAN", "not built yet", note=f"ovdense.heads.san does not import ({e})")
    else:
        _time_san(run, part, san)
    part.check("detector")
    try:
        import ovdense.heads.fvit as detection
    except ImportError as e:
        part.add("detector (F-ViT)", "not built yet", note=f"ovdense.heads.fvit does not import ({e})")
        return
    _time_fvit(run, part, detection)
    part.check("attention")
    _time_attention(run, part)


def _time_fvit(run: Run, part: PartRun, detection) -> None:
    """F-ViT per image (``PlainFViT``, what ``Detector`` runs; random weights, CLIM's OV-COCO head
    layout from ``tools/model_converters/fvit2ovdense.py``, 80 random text rows): the frozen backbone
    (``frozen_features`` with the dense CLIP map) and, on those features, the rest of ``predict``
    (pyramid, FPN, RPN, 1000 RoIs through the box head, ensemble, NMS); the issue's goal is the head
    under the backbone's time (``tools/benchmarks/detect.py`` on the CPU)."""
    import importlib.util

    converter = Path(__file__).resolve().parents[1] / "model_converters" / "fvit2ovdense.py"
    spec = importlib.util.spec_from_file_location("ovdense_tool_fvit2ovdense", converter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plan = run.plan
    backbone = run.backbone(plan.segment_model)
    config = module.head_config(list(module.OV_COCO_BASE))
    width = backbone.width
    config["neck"]["in_channels"] = [width] * 4
    torch.manual_seed(run.seed)
    model = detection.PlainFViT(backbone, config).to(run.device).eval()
    size = plan.san_size
    x = torch.randn(1, 3, size, size, device=run.device)
    meta = dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
    text = F.normalize(torch.randn(80, backbone.embed_dim, device=run.device), dim=-1)
    seen = detection.seen_mask(module.COCO_CLASSES, module.OV_COCO_BASE).to(run.device)
    with torch.inference_mode():
        frozen = detection.frozen_features(backbone, x, model.indices, model.method, with_clip_map=True)
        real = detection.frozen_features
        backbone_s, n = run.timed(partial(real, backbone, x, model.indices, model.method, with_clip_map=True),
                                  part)
        detection.frozen_features = lambda *a, **k: frozen
        try:
            head_s, _ = run.timed(partial(model.predict, x, [meta], text, seen), part)
        finally:
            detection.frozen_features = real
    part.add("F-ViT (plain torch)", model=f"{plan.segment_model} + CLIM's OV-COCO head (random weights)",
             image=f"{size}x{size}", backbone_seconds=backbone_s, head_seconds=head_s,
             head_over_backbone=head_s / backbone_s, repeats=n)


def _time_attention(run: Run, part: PartRun) -> None:
    """One tower block: open_clip's ``nn.MultiheadAttention`` path against ``dense.run_block``
    (``F.scaled_dot_product_attention``), at the token counts of 224², 448² and 1024² (the smoke run:
    the tiny model's), batch 1 (``tools/benchmarks/attention.py`` on the CPU)."""
    from ovdense.backbone.dense import run_block

    backbone = run.backbone(run.plan.segment_model)
    block = backbone.model.visual.transformer.resblocks[0]
    p = backbone.patch_size
    sizes = (224, 448, 1024) if run.plan is FULL else (32, 64)
    with torch.inference_mode():
        for size in sizes:
            part.check(f"block at {size}²")
            x = torch.randn(1, 1 + (size // p) ** 2, backbone.width, device=run.device)
            mha, n = run.timed(partial(block, x), part)
            sdpa, _ = run.timed(partial(run_block, block, x), part)
            diff = float((block(x) - run_block(block, x)).abs().max())
            part.add(f"block at {size}²", tokens=x.shape[1], mha_ms=mha * 1e3, sdpa_ms=sdpa * 1e3,
                     speedup=mha / sdpa, max_abs_diff=diff, repeats=n)


def _time_san(run: Run, part: PartRun, san) -> None:
    """SAN inference (``SanSegmenter.predict``, the official protocol: short side 640, one
    whole-image pass) per image of ``san_size × 4/3·san_size``, a random-weight head (the
    default ``SanConfig``: 100 queries, side ViT width 240, 8 blocks) on the random backbone,
    150 classes (the segment part's count; 5 in the smoke run)."""
    plan = run.plan
    backbone = run.backbone(plan.segment_model)
    torch.manual_seed(run.seed)
    head = san.SanHead(backbone).to(run.device)
    names = [f"class {i}" for i in range(plan.segment_classes)]
    segmenter = san.SanSegmenter(backbone, names, head=head, templates="single", short_side=plan.san_size)
    H, W = plan.san_size, plan.san_size * 4 // 3
    rgb = (np.random.default_rng(run.seed).random((H, W, 3)) * 255).astype(np.uint8)
    with torch.inference_mode():
        result = segmenter.predict(rgb)
        seconds, n = run.timed(partial(segmenter.predict, rgb), part)
        peak_mb = run.peak(partial(segmenter.predict, rgb))
    part.add("SAN", model=f"{plan.segment_model} + SanHead (random weights)", image=f"{H}x{W}",
             classes=len(names), seconds_per_image=seconds, images_per_s=1 / seconds, peak_mb=peak_mb,
             repeats=n, labels_shape="x".join(map(str, result.labels.shape)))


# --------------------------------------------------------------------------------------------
# Runner and report

PART_FUNCTIONS = {"environment": part_environment, "kernels": part_kernels, "segment": part_segment,
                  "winclip": part_winclip, "sam_clip": part_sam_clip, "heads": part_heads}


def run_part(run: Run, name: str, budget_s: float, fail: bool) -> PartRun:
    """One part under its budget; an exception is recorded, never raised."""
    part = PartRun(name, budget_s)
    print(f"\n== {PARTS.index(name) + 1}. {name} (budget {budget_s:.0f} s)", flush=True)
    torch.manual_seed(run.seed)
    try:
        if fail:
            raise RuntimeError(f"injected failure in part {name!r} (--fail-part)")
        part.check("(start)")
        PART_FUNCTIONS[name](run, part)
    except BudgetExhausted:
        pass
    except Exception as e:
        traceback.print_exc()
        part.status = "failed"
        part.error = f"{type(e).__name__}: {e}".splitlines()[0]
        part.add("(part)", "failed", error=part.error)
    finally:
        part.seconds = part.elapsed()
        with contextlib.suppress(Exception):
            run.release()
    print(f"== {name}: {part.status} in {part.seconds:.1f} s", flush=True)
    return part


def csv_bytes(rows: list[dict]) -> bytes:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue().encode()


def report_text(run: Run, parts: list[PartRun], started: str, total_s: float) -> str:
    env = {row["case"]: row.get("value", "") for p in parts if p.name == "environment" for row in p.rows}
    mode = ("smoke (CPU, tiny sizes: the code paths are checked, the figures mean nothing)" if run.args.smoke
            else "full")
    lines = [
        "# ovdense GPU check", "",
        f"- mode: {mode}",
        f"- device: {env.get('GPU', run.device)} (driver {env.get('driver', 'n/a')}, CUDA capability "
        f"{env.get('CUDA capability', 'n/a')}); torch {torch.__version__}, Triton {env.get('triton', '?')}",
        f"- started {started} UTC, {total_s:.1f} s in all; seed {run.seed}; random weights; load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs when written",
        f"- command: `{' '.join(sys.argv)}`", "",
        "| part | status | seconds | rows |", "| --- | --- | --- | --- |",
    ]
    lines += [f"| {PARTS.index(p.name) + 1}. {p.name} | {p.status} | {p.seconds:.1f} of {p.budget_s:.0f} "
              f"| {len(p.rows)} |" for p in parts]
    for p in parts:
        lines += ["", f"## {PARTS.index(p.name) + 1}. {TITLES[p.name]}", "",
                  f"Status: **{p.status}**{' — ' + p.error if p.error else ''}; {p.seconds:.1f} s of "
                  f"{p.budget_s:.0f} s. CSV: `{p.name}.csv`."]
        if p.name in TARGETS:
            lines += ["", f"Targets: {TARGETS[p.name]}."]
        lines += [""] + markdown_table(p.rows)
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    for row in rows:
        cells = [_fmt(row.get(k, "")).replace("|", "/").replace("\n", " ") for k in fields]
        out.append("| " + " | ".join(cells) + " |")
    return out


def parse_parts(values: list[str]) -> list[str]:
    chosen = []
    for value in values:
        name = PARTS[int(value) - 1] if value.isdigit() and 1 <= int(value) <= len(PARTS) else value
        if name not in PARTS:
            raise SystemExit(f"gpu_check: unknown part {value!r}; choose from 1–{len(PARTS)} or "
                             f"{', '.join(PARTS)}")
        chosen.append(name)
    return [p for p in PARTS if p in chosen]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_report.md and the CSVs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every part, well under a minute")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cpu with --smoke, else cuda when torch sees one")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), help="names or numbers 1–6")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for each part (default: per part, 400 s in all; 600 each with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fail-part", default=None, help="for tests: make this part (name or number) raise")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda asked for, but torch sees no CUDA GPU; use --device cpu or --smoke",
              file=sys.stderr)
        return 2
    parts = parse_parts(args.parts)
    fail = parse_parts([args.fail_part])[0] if args.fail_part else None
    # the Triton kernel compiles on a GPU and runs under Triton's interpreter on a CPU; Triton
    # reads this when it is first imported (by open_clip), so before anything imports ovdense
    interpret = "0" if args.device == "cuda" else "1"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != interpret:
        print(f"gpu_check: Triton was imported before TRITON_INTERPRET={interpret} could be set; "
              "run this script as a program, not from an interpreter that imported open_clip",
              file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = interpret
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from ovdense.io import write_bytes

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    start = time.perf_counter()
    done: list[PartRun] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as workdir:
        run = Run(args, Path(workdir))
        print(f"gpu_check: {'smoke' if args.smoke else 'full'} run on {args.device}, parts: "
              f"{', '.join(parts)}; writing {args.out}", flush=True)
        for name in parts:
            budget = args.budget_s if args.budget_s is not None else (
                SMOKE_BUDGET_S if args.smoke else BUDGETS[name])
            done.append(run_part(run, name, budget, fail == name))
            write_bytes(args.out / f"{name}.csv", csv_bytes(done[-1].rows))
            report = report_text(run, done, started, time.perf_counter() - start)
            write_bytes(args.out / "gpu_report.md", report.encode())
    failed = [p.name for p in done if p.status == "failed"]
    print(f"\ngpu_check: {len(done)} parts in {time.perf_counter() - start:.1f} s"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''}; wrote {args.out / 'gpu_report.md'}",
          flush=True)
    print("\n".join(line for line in report.splitlines()[:12 + len(done)]), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
