"""Write a synthetic PhraseCut in PhraseCut's own layout, with regions known to the pixel.

    python tools/data/make_synthetic_phrasecut.py --out synthetic_phrasecut --num-train 200 --num 20

Writes ``--out/VGPhraseCut_v0`` as PhraseCut's ``download_dataset.py`` does (ChenyunWu/PhraseCutDataset,
``utils/file_paths.py``; ``ovdense/mm/phrasecut.py`` reads it):

* ``images/<image_id>.jpg``: coloured squares and right triangles (the synthetic world's colours,
  ``ovdense.data.synthetic.COLOURS``) on a grey, noisy background, of a few sizes, none square;
* ``image_data_split.json``: every image's record (``image_id``, ``width``, ``height``, ``split``,
  ``coco_id``, ``flickr_id``, ``url``);
* ``refer_<split>.json`` and ``refer_input_<split>.json`` for train, val and test: one task per
  phrase of an image (``"red square"``, ``"blue triangle"``), with ``task_id``, ``ann_ids``,
  ``instance_boxes`` (``[x, y, w, h]``), ``Polygons`` (instance → polygons → ``[x, y]`` points)
  and ``phrase_structure``. Some phrases have two instances; some instances are two polygons
  (the square's upper and lower parts).

Every vertex is an integer corner plus a fraction below 0.9 and every edge is horizontal, vertical
or diagonal, so the region is exact under PhraseCut's rasterisation (points truncated, polygons
filled with their outline): ``write_phrasecut`` returns each task's shapes, from which a test can
draw the region by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ovdense.data.synthetic import COLOURS
from ovdense.io import write_image, write_json

SIZES = ((64, 96), (72, 80), (96, 64), (80, 104))  # (H, W) of the images, drawn in turn
SPLITS = ("train", "val", "test")


def shape_pixels(kind: str, x0: int, y0: int, side: int, height: int, width: int) -> np.ndarray:
    """``bool [height, width]``: the pixels of a shape ``(kind, x0, y0, side)`` within columns
    ``x0 … x0 + side`` and rows ``y0 … y0 + side``: a ``"square"`` fills them; a ``"triangle"``
    has its right angle at the bottom left ``(x0, y0 + side)``, a ``"mirrored triangle"`` at the
    bottom right."""
    yy, xx = np.mgrid[0:height, 0:width]
    box = (xx >= x0) & (xx <= x0 + side) & (yy >= y0) & (yy <= y0 + side)
    if kind == "square":
        return box
    if kind == "triangle":
        return box & (xx - x0 <= yy - y0)
    if kind == "mirrored triangle":
        return box & (x0 + side - xx <= yy - y0)
    raise ValueError(f"unknown shape {kind!r}")


def _corners(kind: str, x0: int, y0: int, side: int) -> list[list[tuple[int, int]]]:
    """The polygons of a shape as integer ``(x, y)`` corners; a square is sometimes two."""
    x1, y1 = x0 + side, y0 + side
    if kind == "triangle":
        return [[(x0, y0), (x0, y1), (x1, y1)]]
    if kind == "mirrored triangle":
        return [[(x1, y0), (x1, y1), (x0, y1)]]
    return [[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]


def _split_square(x0: int, y0: int, side: int) -> list[list[tuple[int, int]]]:
    middle, x1, y1 = y0 + side // 2, x0 + side, y0 + side
    return [[(x0, y0), (x1, y0), (x1, middle), (x0, middle)],
            [(x0, middle), (x1, middle), (x1, y1), (x0, y1)]]


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int, int]], height: int, width: int
           ) -> tuple[int, int, int] | None:
    """A free box ``(x0, y0, side)`` two pixels clear of the others, or None."""
    for _ in range(100):
        side = int(rng.integers(10, 22))
        x0, y0 = int(rng.integers(1, width - side - 1)), int(rng.integers(1, height - side - 1))
        box = (x0 - 2, y0 - 2, x0 + side + 2, y0 + side + 2)
        if all(box[2] < a or b < box[0] or box[3] < c or d < box[1] for a, c, b, d in taken):
            taken.append((x0, y0, x0 + side, y0 + side))
            return x0, y0, side
    return None


def _scene(rng: np.random.Generator, height: int, width: int) -> dict[str, list[tuple]]:
    """Phrase → its shapes ``(kind, x0, y0, side, split_in_two)``: 2–3 phrases, sometimes one of
    them with two instances."""
    taken: list[tuple[int, int, int, int]] = []
    colours = list(COLOURS)
    scene: dict[str, list[tuple]] = {}
    wanted = int(rng.integers(2, 4))
    for _ in range(50):
        if len(scene) == wanted:
            break
        kind = str(rng.choice(["square", "triangle", "mirrored triangle"]))
        phrase = f"{colours[int(rng.integers(len(colours)))]} {kind.split()[-1]}"
        if phrase in scene:
            continue
        copies = 2 if rng.random() < 0.3 else 1
        shapes = []
        for _ in range(copies):
            spot = _place(rng, taken, height, width)
            if spot is not None:
                shapes.append((kind, *spot, kind == "square" and bool(rng.random() < 0.4)))
        if shapes:
            scene[phrase] = shapes
    return scene


def write_phrasecut(out: str | Path, num_train: int = 8, num_val: int = 2, num_test: int = 4, seed: int = 0,
                    noise: float = 8.0) -> dict:
    """Write the three splits under ``out/VGPhraseCut_v0``; return ``{"root": that folder,
    "tasks": {task_id: {"split", "image_id", "phrase", "height", "width", "shapes": [(kind, x0,
    y0, side), …]}}}``."""
    counts = dict(train=num_train, val=num_val, test=num_test)
    if min(counts.values()) <= 0:
        raise ValueError("every split needs at least one image")
    root = Path(out) / "VGPhraseCut_v0"
    rng = np.random.default_rng(seed)
    records, known, image_id, ann_id = [], {}, 1000, 1
    for split in SPLITS:
        tasks = []
        for _ in range(counts[split]):
            image_id += 1
            height, width = SIZES[image_id % len(SIZES)]
            scene = _scene(rng, height, width)
            base = rng.uniform(100, 150)
            image = np.clip(base + rng.normal(0.0, noise, (height, width, 3)), 0, 255)
            for phrase, shapes in scene.items():
                colour = np.array(COLOURS[phrase.split()[0]], np.float64)
                ids, boxes, polygons = [], [], []
                for kind, x0, y0, side, two in shapes:
                    image[shape_pixels(kind, x0, y0, side, height, width)] = colour
                    corners = _split_square(x0, y0, side) if two else _corners(kind, x0, y0, side)
                    # integer corner + a fraction below 0.9: truncation gives the corner back
                    polygons.append([[[round(x + float(rng.uniform(0, 0.9)), 3),
                                       round(y + float(rng.uniform(0, 0.9)), 3)] for x, y in polygon]
                                     for polygon in corners])
                    boxes.append([x0, y0, side + 1, side + 1])
                    ids.append(ann_id)
                    ann_id += 1
                task_id = f"{image_id}__{'_'.join(str(i) for i in ids)}"
                colour_name, shape_name = phrase.split()
                tasks.append({
                    "task_id": task_id, "image_id": image_id, "ann_ids": ids, "instance_boxes": boxes,
                    "Polygons": polygons, "phrase": phrase,
                    "phrase_structure": {"name": shape_name, "attributes": [colour_name], "relation_ids": [],
                                         "relation_descriptions": [], "type": "attribute"},
                })
                known[task_id] = {"split": split, "image_id": image_id, "phrase": phrase, "height": height,
                                  "width": width, "shapes": [s[:4] for s in shapes]}
            write_image(root / "images" / f"{image_id}.jpg", image.astype(np.uint8), quality=95)
            records.append({"image_id": image_id, "coco_id": None, "flickr_id": None, "width": width,
                            "height": height, "split": split,
                            "url": f"https://example.invalid/synthetic/{image_id}.jpg"})
        write_json(root / f"refer_{split}.json", tasks)
        inputs = [{k: t[k] for k in ("task_id", "image_id", "phrase", "phrase_structure")} for t in tasks]
        write_json(root / f"refer_input_{split}.json", inputs)
    write_json(root / "image_data_split.json", records)
    return {"root": root, "tasks": known}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write VGPhraseCut_v0/ in")
    parser.add_argument("--num-train", type=int, default=200, help="training images")
    parser.add_argument("--num", type=int, default=20, help="images of val and of test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num <= 0 or args.num_train <= 0:
        parser.error("--num and --num-train must be positive")
    written = write_phrasecut(args.out, args.num_train, args.num, args.num, args.seed)
    print(f"{len(written['tasks'])} tasks in {written['root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
