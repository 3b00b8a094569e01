"""Benchmark SAM + CLIP: ovdense's one-pass mask classification against crop-and-encode per mask.

    python tools/benchmarks/sam_clip.py --model ViT-B-16 --pretrained none --out runs/bench_sam_clip.csv

For M ∈ {25, 100, 250} masks on one ``--size``² image, all measured in the same run:

* **recipe** — the common SAM + CLIP recipe (autodistill's SAM-CLIP, many Grounded-SAM
  notebooks), written here: for every mask, crop its box, fill the pixels outside it with the mean
  colour, resize to CLIP's native size, encode the crop, encode the prompts, softmax, argmax —
  two CLIP passes per mask;
* **ovdense** — ``SamClipSegmenter``: the prompts encoded once, one dense CLIP pass
  (``clearclip``), every mask pooled and classified at once, plus the semantic map;
* **ovdense + crops** — the same with the optional crop refinement for the masks under 1 % of
  the image (``crop_area=0.01``, about 30 % of these masks): their crops go through CLIP in
  batches of 32.

Columns: CLIP forward passes (image and text calls, counted), the classification stage's time
(best of ``--repeats``; prompts encoded without the cache in every path), the ratio recipe /
ovdense, and the SAM stage's share of the whole (SAM + classification) per path.

The recipe is a loop of identical per-mask work, so it is timed on the first ``--recipe-masks``
masks (default 10; 0 = all) and scaled to M; the table says how many were timed, and passes are
counted for all M. The SAM stage is segment-anything's automatic mask generator (one image
embedding, the decoder over ``--points-per-side``² points, its filters), timed once. Its weights
are random unless ``--sam-checkpoint``, so few of its masks pass the quality filters: the masks
classified are drawn shapes of the synthetic world (0.3 %–20 % of the image), which is all the
classification cost depends on. SAM's own default grid is 32 points per side; the default here
is 16, to finish in minutes on two CPU cores (the decoder's time grows with the points).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from functools import partial, wraps
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ovdense import create_backbone
from ovdense.data.synthetic import SHAPES, SceneConfig, colour_shape_classes, render_scene, shape_mask
from ovdense.heads.sam_clip import SamClipSegmenter, load_sam
from ovdense.io import write_bytes

TABLE = [  # CSV column, table heading, value format
    ("M", "M", "{}"),
    ("recipe_masks_timed", "timed", "{}"),
    ("passes_recipe", "passes recipe", "{}"),
    ("passes_ovdense", "ovdense", "{}"),
    ("passes_ovdense_crops", "+crops", "{}"),
    ("seconds_recipe", "s recipe", "{:.2f}"),
    ("seconds_ovdense", "s ovdense", "{:.2f}"),
    ("seconds_ovdense_crops", "s +crops", "{:.2f}"),
    ("speedup", "recipe/ovdense", "{:.1f}×"),
    ("sam_seconds", "s SAM", "{:.1f}"),
    ("sam_share_recipe", "SAM share recipe", "{:.0%}"),
    ("sam_share_ovdense", "ovdense", "{:.0%}"),
]


class PassCounter:
    """Counts the CLIP forward calls: dense and global image passes and text-tower batches
    (open_clip's full pass, and ovdense's truncated one, ``backbone.text.encode_truncated``,
    which ``encode_text`` takes for causal towers)."""

    def __init__(self, backbone):
        from ovdense.backbone import text

        self.count = 0
        for owner, name in ((backbone, "encode_dense"), (backbone, "encode_image"),
                            (backbone.model, "encode_text"), (text, "encode_truncated")):
            setattr(owner, name, self._counted(getattr(owner, name)))

    def _counted(self, fn):
        @wraps(fn)
        def call(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)
        return call


def random_masks(count: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``[M, H, W]`` bool shapes of the synthetic world, areas log-uniform in 0.3 %–20 % of the image."""
    H, W = size
    masks = []
    for _ in range(count):
        area = np.exp(rng.uniform(np.log(0.003), np.log(0.2))) * H * W
        radius = float(np.sqrt(area / np.pi))
        centre = (rng.uniform(radius, W - radius), rng.uniform(radius, H - radius))
        masks.append(shape_mask(str(rng.choice(SHAPES)), size, centre, radius, rng.uniform(0, 2 * np.pi)))
    return np.stack(masks)


@torch.inference_mode()
def crop_and_encode(backbone, rgb: np.ndarray, masks: np.ndarray, prompts: list[str],
                    logit_scale: float) -> np.ndarray:
    """The common recipe: one image pass and one text pass per mask. Labels ``[M]``."""
    x = backbone.to_tensor(rgb)[0].float()  # 3, H, W; the mean colour is 0 once normalised
    labels = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        keep = torch.from_numpy(mask[y0:y1, x0:x1]).to(x.device)
        crop = F.interpolate((x[:, y0:y1, x0:x1] * keep)[None], size=backbone.native_size,
                             mode="bicubic", align_corners=False)  # 1, 3, h, w
        image = backbone.encode_image(crop.to(backbone.dtype))  # 1, D
        text = backbone.encode_text(prompts, "single", use_cache=False)  # C, D
        probs = torch.softmax(logit_scale * image.float() @ text.T, dim=-1)
        labels.append(int(probs.argmax()))
    return np.array(labels)


@torch.inference_mode()
def one_pass(segmenter: SamClipSegmenter, rgb: np.ndarray, masks: np.ndarray):
    """ovdense: the prompts once (no cache), one dense pass, all masks classified together."""
    segmenter.text = segmenter.backbone.encode_text(segmenter.vocabulary.prompts, "single", use_cache=False)
    segmenter.set_image(rgb)
    return segmenter.predict(masks=masks)


def best_time(fn, repeats: int, counter: PassCounter) -> tuple[float, int]:
    """Best wall time over ``repeats`` and the CLIP passes of one run."""
    best, passes = float("inf"), 0
    for _ in range(repeats):
        before = counter.count
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        passes = counter.count - before
    return best, passes


@torch.inference_mode()
def sam_stage(args, rgb: np.ndarray) -> tuple[float, int]:
    """Seconds of segment-anything's automatic mask generator on ``rgb`` (one image embedding,
    the decoder over the point grid, the filters), and the number of masks it keeps."""
    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

    if args.sam_checkpoint:
        sam = load_sam(args.sam_checkpoint, args.sam_model, device=args.device)
    else:
        sam = sam_model_registry[args.sam_model](checkpoint=None).to(args.device).eval()
    generator = SamAutomaticMaskGenerator(sam, points_per_side=args.points_per_side)
    start = time.perf_counter()
    masks = generator.generate(rgb)
    return time.perf_counter() - start, len(masks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none", help="'none' = random weights")
    parser.add_argument("--masks", type=int, nargs="+", default=[25, 100, 250])
    parser.add_argument("--classes", type=int, default=20, help="number of classes (≤ 31)")
    parser.add_argument("--size", type=int, default=512, help="the image is size × size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sam-model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    parser.add_argument("--sam-checkpoint", help="SAM weights (default: random weights)")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--recipe-masks", type=int, default=10,
                        help="time the recipe on this many masks and scale to M (0 = all)")
    parser.add_argument("--no-sam", action="store_true", help="skip the SAM stage")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_sam_clip.csv"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    backbone = create_backbone(args.model, pretrained=pretrained, device=args.device)
    counter = PassCounter(backbone)
    classes = colour_shape_classes()[: args.classes]
    scene = render_scene(rng, SceneConfig(size=(args.size, args.size), objects=(3, 6)))
    rgb = scene.image
    plain = SamClipSegmenter(backbone, None, classes, templates="single")
    crops = SamClipSegmenter(backbone, None, classes, templates="single", crop_area=0.01)
    prompts = list(plain.vocabulary.prompts)

    sam_seconds, sam_masks = (0.0, 0) if args.no_sam else sam_stage(args, rgb)
    if not args.no_sam:
        print(f"SAM {args.sam_model} stage ({args.points_per_side}² points, {args.size}² image): "
              f"{sam_seconds:.1f} s, {sam_masks} masks passed its filters", flush=True)
    print(f"{args.model} ({args.pretrained}), {args.device}, {len(classes)} classes, "
          f"image {args.size}², best of {args.repeats}")
    widths = [max(len(heading), 6) for _, heading, _ in TABLE]
    print(" ".join(heading.rjust(w) for (_, heading, _), w in zip(TABLE, widths)), flush=True)
    rows = []
    for M in args.masks:
        masks = random_masks(M, rgb.shape[:2], rng)
        timed = min(M, args.recipe_masks) if args.recipe_masks > 0 else M
        recipe = partial(crop_and_encode, backbone, rgb, masks[:timed], prompts, plain.logit_scale)
        t_recipe, n_recipe = best_time(recipe, args.repeats, counter)
        t_recipe, n_recipe = t_recipe * M / timed, n_recipe * M // timed  # the loop is linear in M
        t_ours, n_ours = best_time(partial(one_pass, plain, rgb, masks), args.repeats, counter)
        t_crops, n_crops = best_time(partial(one_pass, crops, rgb, masks), args.repeats, counter)
        rows.append({
            "M": M, "recipe_masks_timed": timed, "passes_recipe": n_recipe, "passes_ovdense": n_ours,
            "passes_ovdense_crops": n_crops, "seconds_recipe": t_recipe, "seconds_ovdense": t_ours,
            "seconds_ovdense_crops": t_crops, "speedup": t_recipe / t_ours, "sam_seconds": sam_seconds,
            "sam_share_recipe": sam_seconds / (sam_seconds + t_recipe),
            "sam_share_ovdense": sam_seconds / (sam_seconds + t_ours),
        })
        print(" ".join(fmt.format(rows[-1][key]).rjust(w) for (key, _, fmt), w in zip(TABLE, widths)),
              flush=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _, _ in TABLE])
    writer.writeheader()
    writer.writerows([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    write_bytes(args.out, buffer.getvalue().encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cv2.setNumThreads(1)
    sys.exit(main())
