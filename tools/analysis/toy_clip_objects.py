"""How well the toy CLIP's class token names objects: single objects and objects cut from scenes.

    python tools/analysis/toy_clip_objects.py --model toy --out runs/toy_objects

Two measurements of the image embedding (``encode_image``) against the prompts of the
training wording (``"a photo of a red circle"``, ``"a photo of a circle"``,
``"a photo of a red object"``), every image drawn from seeds disjoint from training:

* **single objects**: ``--single`` native-size images of one object, named among the 6 colours,
  5 shapes and 30 colour–shape pairs (``eval_synthetic.zero_shot_accuracy``, run here with this
  tool's seed);
* **cut objects**: every object of ``--scenes`` multi-object scenes (the scene generator's
  defaults: 128 px, 1–4 objects, radius 0.09–0.17, occlusion) cut out with a square crop
  around its circumscribed circle (side 2.3 · radius, moved inside the image where it would
  cross the border), resized to the native input — once **alone on black** (every pixel not
  of that object's visible mask set to 0) and once **as cut** (background and neighbours kept).

Prints the accuracies and writes ``OUT/objects.json`` and a contact sheet of the first cuts
(``OUT/cuts.jpg``: top row alone, bottom row as cut, the predicted pair written under each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from ovdense import create_backbone
from ovdense.data.synthetic import COLOURS, SHAPES, SceneConfig, render_scene
from ovdense.io import write_image, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_synthetic import zero_shot_accuracy  # noqa: E402  (the single-object measurement)

SEED = 20_261_207  # disjoint from the training seeds (seed, step) and tools/analysis/eval_synthetic.py's
PAIRS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
MARGIN = 1.15  # crop half-side / object radius


def prompts() -> dict[str, list[str]]:
    return {
        "colour": [f"a photo of a {c} object" for c in COLOURS],
        "shape": [f"a photo of a {s}" for s in SHAPES],
        "pair": [f"a photo of a {p}" for p in PAIRS],
    }


def truth_of(obj) -> dict[str, int]:
    return {"colour": list(COLOURS).index(obj.colour), "shape": SHAPES.index(obj.shape),
            "pair": PAIRS.index(f"{obj.colour} {obj.shape}")}


def crop_box(centre: tuple[float, float], radius: float, size: tuple[int, int]) -> tuple[int, int, int]:
    """``(x0, y0, side)`` of the square crop around an object, inside an ``(H, W)`` image."""
    H, W = size
    side = int(round(min(2 * MARGIN * radius, H, W)))
    x0 = int(round(min(max(centre[0] - side / 2, 0), W - side)))
    y0 = int(round(min(max(centre[1] - side / 2, 0), H - side)))
    return x0, y0, side


def cut_objects(scenes, native: int):
    """Every visible object as ``(alone, as_cut, object)``: two ``native × native`` RGB crops."""
    out = []
    for scene in scenes:
        for index, obj in enumerate(scene.objects, start=1):
            x0, y0, side = crop_box(obj.centre, obj.radius, scene.image.shape[:2])
            crop = scene.image[y0:y0 + side, x0:x0 + side]
            mask = scene.instance[y0:y0 + side, x0:x0 + side] == index
            alone = np.where(mask[..., None], crop, 0).astype(np.uint8)
            resize = (native, native)
            out.append((cv2.resize(alone, resize, interpolation=cv2.INTER_AREA),
                        cv2.resize(crop, resize, interpolation=cv2.INTER_AREA), obj))
    return out


def accuracy(backbone, images: list[np.ndarray], truths: list[dict[str, int]],
             text: dict[str, torch.Tensor]) -> tuple[dict, np.ndarray]:
    """Accuracy per vocabulary, and the predicted pair of every image."""
    feats = []
    with torch.no_grad():
        for start in range(0, len(images), 128):
            batch = torch.cat([backbone.to_tensor(image) for image in images[start:start + 128]])
            feats.append(backbone.encode_image(batch))
    feats = torch.cat(feats)  # N, D
    result, pair_pred = {}, None
    for name, rows in text.items():
        pred = (feats @ rows.T).argmax(dim=1).numpy()
        result[name] = float(np.mean(pred == np.array([t[name] for t in truths])))
        if name == "pair":
            pair_pred = pred
    return result, pair_pred


def contact_sheet(cuts, predicted: np.ndarray, predicted_cut: np.ndarray, count: int = 12) -> np.ndarray:
    tiles = []
    for row, preds in ((0, predicted), (1, predicted_cut)):
        line = []
        for (alone, as_cut, obj), pred in zip(cuts[:count], preds[:count]):
            tile = cv2.resize(alone if row == 0 else as_cut, (96, 96), interpolation=cv2.INTER_NEAREST)
            label = np.full((28, 96, 3), 255, np.uint8)
            good = PAIRS[pred] == f"{obj.colour} {obj.shape}"
            cv2.putText(label, PAIRS[pred], (2, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 120, 0) if good else (200, 0, 0), 1)
            line.append(np.concatenate([tile, label], axis=0))
        tiles.append(np.concatenate(line, axis=1))
    return np.concatenate(tiles, axis=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toy", help="model name or JSON config")
    parser.add_argument("--pretrained", default=None, help="weights file for a JSON config")
    parser.add_argument("--single", type=int, default=300, help="single-object images")
    parser.add_argument("--scenes", type=int, default=60, help="multi-object scenes to cut objects from")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=Path("runs/toy_objects"))
    args = parser.parse_args(argv)

    backbone = create_backbone(args.model, pretrained=args.pretrained)
    native = backbone.native_size[0]
    with torch.no_grad():
        text = {name: backbone.encode_text(rows, ["{}"]) for name, rows in prompts().items()}

    single = zero_shot_accuracy(backbone, args.single, args.seed)
    single_acc = {"colour": single["colour (6-way)"], "shape": single["shape (5-way)"],
                  "pair": single["colour+shape (30-way)"]}

    scenes = [render_scene(np.random.default_rng([args.seed, 2, i]), SceneConfig())
              for i in range(args.scenes)]
    cuts = cut_objects(scenes, native)
    truths = [truth_of(obj) for _, _, obj in cuts]
    alone_acc, alone_pred = accuracy(backbone, [a for a, _, _ in cuts], truths, text)
    cut_acc, cut_pred = accuracy(backbone, [c for _, c, _ in cuts], truths, text)

    print(f"{'':<22}{'colour':>8}{'shape':>8}{'pair':>8}")
    rows = (("single objects", single_acc), ("cut, alone on black", alone_acc), ("cut, as cut", cut_acc))
    for name, acc in rows:
        print(f"{name:<22}" + "".join(f"{acc[k]:>8.3f}" for k in ("colour", "shape", "pair")))
    print(f"({args.single} single-object images; {len(cuts)} objects cut from {args.scenes} scenes)")
    write_json(args.out / "objects.json", {
        "model": args.model, "seed": args.seed, "single": single_acc, "cut_alone": alone_acc,
        "cut_as_cut": cut_acc, "num_single": args.single, "num_cut": len(cuts), "num_scenes": args.scenes,
    })
    write_image(args.out / "cuts.jpg", contact_sheet(cuts, alone_pred, cut_pred))
    print(f"wrote {args.out / 'objects.json'} and {args.out / 'cuts.jpg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
