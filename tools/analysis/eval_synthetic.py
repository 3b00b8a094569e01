"""Measure the training-free methods on held-out synthetic scenes.

    python tools/analysis/eval_synthetic.py --model toy --num 40 --out runs/eval

For every method and each vocabulary (colours, shapes, colour+shape) it segments ``--num``
scenes of the synthetic world (seed ``--seed``, disjoint from the training seeds, which are
``(seed, step)`` pairs of ``train_toy_clip.py``), prints the mIoU table and writes
``OUT/miou.json`` and one overlay per method (``OUT/overlay_<method>.jpg``). It also prints
the zero-shot accuracy of the global image embedding on single-object images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ovdense import Segmenter, create_backbone
from ovdense.backbone.dense import METHODS
from ovdense.data.synthetic import (
    COLOURS,
    SHAPES,
    SceneConfig,
    colour_classes,
    colour_shape_classes,
    render_scene,
    shape_classes,
)
from ovdense.errors import OvdenseError
from ovdense.eval.segmentation import ConfusionMatrix
from ovdense.io import overlay, write_image, write_json

EVAL_SEED = 10_000_019  # far from any training seed
SCENE_RADIUS = (0.12, 0.2)  # at 128 px: the objects' pixel size in the toy model's training

TEMPLATE = "a photo of a {}"  # the training captions' wording


def colour_object_classes() -> list[str]:
    """Colours as the captions say them alone: ``"red object"``."""
    return ["background"] + [f"{c} object" for c in colour_classes()[1:]]


VOCABULARIES = {
    "colour": (colour_object_classes, "colour"),
    "shape": (shape_classes, "shape"),
    "colour+shape": (colour_shape_classes, "colour_shape"),
}


def zero_shot_accuracy(backbone, num: int, seed: int) -> dict[str, float]:
    """Accuracy of ``encode_image`` vs ``encode_text`` on single-object native-size images."""
    side = backbone.native_size[0]
    config = SceneConfig(size=(side, side), objects=(1, 1), radius=(0.2, 0.33))
    rng = np.random.default_rng([seed, 1])
    scenes = [render_scene(rng, config) for _ in range(num)]
    images = torch.cat([backbone.to_tensor(s.image) for s in scenes])
    with torch.no_grad():
        feats = backbone.encode_image(images)  # N, D
    result = {}
    for name, classes, truth in (
        ("colour (6-way)", list(COLOURS), [list(COLOURS).index(s.objects[0].colour) for s in scenes]),
        ("shape (5-way)", list(SHAPES), [SHAPES.index(s.objects[0].shape) for s in scenes]),
        ("colour+shape (30-way)", colour_shape_classes()[1:],
         [colour_shape_classes().index(f"{s.objects[0].colour} {s.objects[0].shape}") - 1 for s in scenes]),
    ):
        prompts = [f"a photo of a {c} object" if c in COLOURS else f"a photo of a {c}" for c in classes]
        text = backbone.encode_text(prompts, ["{}"])
        pred = (feats @ text.T).argmax(dim=1).cpu().numpy()
        result[name] = float((pred == np.array(truth)).mean())
    return result


def evaluate_method(backbone, method, scenes, args, window):
    """mIoU and per-class IoU of one method under every vocabulary."""
    miou, per_class = {}, {}
    for vocab_name, (make_classes, field) in VOCABULARIES.items():
        classes = make_classes()
        segmenter = Segmenter(backbone, method, classes, templates=[args.template],
                              short_side=args.size, window=window)
        matrix = ConfusionMatrix(len(classes))
        for index, scene in enumerate(scenes):
            result = segmenter.predict(scene.image)
            matrix.update(result.labels, getattr(scene, field))
            if index == 0 and vocab_name == "colour+shape":
                picture = overlay(scene.image, result.labels, result.classes)
                write_image(args.out / f"overlay_{method}.jpg", picture)
        scores = matrix.scores()
        miou[vocab_name] = scores.miou
        per_class[vocab_name] = [None if np.isnan(v) else float(v) for v in scores.iou]
    return miou, per_class


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy", help="model name or JSON config")
    parser.add_argument("--pretrained", default=None, help="weights file for a JSON config")
    parser.add_argument("--num", type=int, default=40, help="scenes per vocabulary")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--size", type=int, default=128, help="scene side in pixels")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--template", default=TEMPLATE)
    parser.add_argument("--window", type=int, nargs=2, default=None,
                        help="window crop/stride (default: the model's native size, half stride)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval_synthetic"))
    args = parser.parse_args(argv)

    from tqdm import tqdm

    backbone = create_backbone(args.model, pretrained=args.pretrained)
    native = backbone.native_size[0]
    window = args.window or backbone.defaults.get("window", (native, native // 2))
    window = tuple(window)
    accuracy = zero_shot_accuracy(backbone, 300, args.seed)
    print("zero-shot accuracy:", {k: round(v, 3) for k, v in accuracy.items()})

    config = SceneConfig(size=(args.size, args.size), radius=SCENE_RADIUS)
    scenes = [render_scene(np.random.default_rng([args.seed, 2, i]), config) for i in range(args.num)]
    table: dict[str, dict[str, float]] = {}
    per_class: dict[str, dict[str, list[float]]] = {}
    skipped: dict[str, str] = {}
    for method in tqdm(args.methods, desc="methods", file=sys.stderr):
        try:
            table[method], per_class[method] = evaluate_method(backbone, method, scenes, args, window)
        except OvdenseError as e:  # e.g. ITACLIP needs 11+ blocks
            skipped[method] = str(e)
            table.pop(method, None)

    header = f"{'method':<10}" + "".join(f"{v:>14}" for v in VOCABULARIES)
    print(header)
    for method, row in table.items():
        print(f"{method:<10}" + "".join(f"{100 * row[v]:>14.1f}" for v in VOCABULARIES))
    for method, reason in skipped.items():
        print(f"{method:<10} not run: {reason}")
    print("per-class IoU (%), background first:")
    for method, rows in per_class.items():
        for vocab_name, ious in rows.items():
            cells = " ".join("  - " if v is None else f"{100 * v:4.0f}" for v in ious)
            print(f"  {method:<10} {vocab_name:<13} {cells}")
    write_json(args.out / "miou.json", {
        "model": args.model, "num": args.num, "seed": args.seed, "window": list(window),
        "zero_shot": accuracy, "miou": table, "skipped": skipped, "per_class_iou": per_class,
    })
    print(f"wrote {args.out / 'miou.json'} and overlays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
