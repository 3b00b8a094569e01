"""Write the toy open-vocabulary detection world in the COCO-instances layout (OV-COCO style).

    python tools/data/make_synthetic_detection.py --out synthetic/detection --num-train 2000 --num 100

Writes, under ``--out/coco`` (the layout of ``ovdense.data.layouts``' ``coco-instances``):

* ``train2017/%012d.jpg`` and ``annotations/instances_train2017.json``: ``--num-train`` scenes
  whose json holds only the 20 *base* colour–shape pairs (categories and annotations) of
  ``synthetic.open_vocabulary_split``; the novel objects stay in the pictures, unlabelled, as
  the OVR-CNN split of COCO leaves them — training never sees a novel label;
* ``val2017/…`` and ``annotations/instances_val2017.json``: ``--num`` held-out scenes (other
  seeds) with all 30 pairs.

Category ids are ``1 + index`` in ``synthetic.colour_shape_classes()[1:]`` in both files, so a
detection's category is the same number in both; segmentations are compressed COCO RLE
(``ovdense.data.rle``), boxes ``[x, y, w, h]`` of the visible pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ovdense.data import rle
from ovdense.data.layouts import hash_split
from ovdense.data.synthetic import (
    SHAPES,
    SceneConfig,
    colour_shape_classes,
    open_vocabulary_split,
    render_scene,
)
from ovdense.io import write_image, write_json

SEED_OFFSET = 20  # scenes differ from every other synthetic set of the project


def write_detection_world(out: str | Path, num_train: int, num_val: int, seed: int = 0,
                          size: int = 128, novel_shape: str | None = None) -> Path:
    """Write both splits under ``out/coco``; return that folder. ``novel_shape``: every pair of that
    shape is novel (``synthetic.open_vocabulary_split``), unlabelled in the training json."""
    if num_train <= 0 or num_val <= 0:
        raise ValueError("num_train and num_val must be positive")
    top = Path(out) / "coco"
    names = colour_shape_classes()[1:]
    base, _ = open_vocabulary_split(novel_shape)
    categories = [{"id": i, "name": n, "supercategory": n.split()[1]} for i, n in enumerate(names, 1)]
    config = SceneConfig(size=(size, size))
    annotation_id = 1
    for split, num, keep in (("train2017", num_train, set(base)), ("val2017", num_val, set(names))):
        images, annotations = [], []
        for index in tqdm(range(num), desc=split, unit="scene", leave=False):
            rng = np.random.default_rng([seed + SEED_OFFSET, hash_split(split), index])
            scene = render_scene(rng, config)
            image_id = index + 1 + (0 if split == "train2017" else 500000)
            file_name = f"{image_id:012d}.jpg"
            write_image(top / split / file_name, scene.image)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for obj_index, obj in enumerate(scene.objects, start=1):
                name = f"{obj.colour} {obj.shape}"
                if name not in keep:
                    continue
                mask = scene.instance == obj_index
                encoded = rle.encode(mask)
                annotations.append({
                    "id": annotation_id, "image_id": image_id, "category_id": names.index(name) + 1,
                    "segmentation": encoded, "area": rle.area(encoded), "bbox": rle.bbox(mask), "iscrowd": 0,
                })
                annotation_id += 1
        write_json(top / "annotations" / f"instances_{split}.json", {
            "info": {"description": f"ovdense synthetic open-vocabulary detection world ({split})",
                     "version": "1.0"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [c for c in categories if c["name"] in keep],
        })
    return top


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-train", type=int, default=2000, help="training scenes (base labels only)")
    parser.add_argument("--num", type=int, default=100, help="held-out evaluation scenes (all pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--novel-shape", choices=list(SHAPES),
                        help="every pair of this shape novel (6 novel, 24 base), not the 10 novel pairs")
    args = parser.parse_args(argv)
    if args.num <= 0 or args.num_train <= 0 or args.size < 32:
        parser.error("--num and --num-train must be positive and --size at least 32")
    print(write_detection_world(args.out, args.num_train, args.num, args.seed, args.size, args.novel_shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
