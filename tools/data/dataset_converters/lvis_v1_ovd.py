"""The OV-LVIS training split from LVIS v1: base = frequent + common categories (866), novel =
rare (337), the split of ViLD, Detic, F-VLM and F-ViT.

    python tools/data/dataset_converters/lvis_v1_ovd.py data/lvis_v1/annotations/lvis_v1_train.json

Writes, next to the input (or into ``--out-dir``):

* ``lvis_v1_train_base.json``: the input with every rare-category annotation removed and only
  the frequent and common categories listed (category-id order, so mmdet's ``LVISV1Dataset``
  gives label ``i`` to the ``i``-th base category); every image is kept (an image left with no
  annotation is dropped at training time by the dataset's ``filter_empty_gt``), and its
  ``neg_category_ids`` / ``not_exhaustive_category_ids`` keep only base categories. Rare names
  therefore never reach training, as in F-ViT, which masks them with class weight 0
  (wusize/CLIPSelf ``F-ViT/models/custom_losses.py`` with ``lvis_v1_train_cat_norare_info.json``);
* ``lvis_v1_base_classes.txt`` (866 lines) and ``lvis_v1_all_classes.txt`` (1203 lines): the
  training and test vocabularies, one name per line in category-id order (the order of the
  labels of ``lvis_v1_train_base.json`` and of ``lvis_v1_val.json``), written as F-ViT writes
  them for the text encoder (``F-ViT/tools/clip_utils.py`` ``processed_name``: ``_`` → space,
  ``/`` → `` or ``, lower case, no trailing dot), e.g. ``arctic (type of shoe)``.

It prints the counts and the iterations of F-ViT's 48 epochs at global batch 64 for this file
(``train_cfg.max_iters`` of ``configs/ovdet/fvit_vitb16_ovlvis.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ovdense.io import write_bytes

BASE_FREQUENCIES = ("f", "c")  # frequent (> 100 training images), common (11–100); rare: 1–10
TRAIN_JSON = "lvis_v1_train_base.json"
BASE_CLASSES = "lvis_v1_base_classes.txt"
ALL_CLASSES = "lvis_v1_all_classes.txt"


def class_name(lvis_name: str) -> str:
    """A category's name as the text encoder reads it (F-ViT's ``processed_name``)."""
    return lvis_name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def base_split(lvis: dict) -> tuple[dict, list[str], list[str]]:
    """``(base-only LVIS dict, base names, all names)`` of an LVIS v1 annotation dict."""
    categories = sorted(lvis.get("categories") or [], key=lambda c: c["id"])
    if not categories or any(c.get("frequency") not in ("r", "c", "f") for c in categories):
        raise ValueError("not an LVIS v1 annotation file: every category needs a 'frequency' of r, c or f")
    names = [class_name(c["name"]) for c in categories]
    if len(set(names)) != len(names):
        raise ValueError("two categories have the same name once written for the text encoder")
    base = [c for c in categories if c["frequency"] in BASE_FREQUENCIES]
    base_ids = {c["id"] for c in base}
    images = []
    for image in lvis["images"]:
        image = dict(image)
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in image:
                image[key] = [i for i in image[key] if i in base_ids]
        images.append(image)
    converted = {key: value for key, value in lvis.items()
                 if key not in ("categories", "annotations", "images")}
    converted["images"] = images
    converted["annotations"] = [a for a in lvis["annotations"] if a["category_id"] in base_ids]
    converted["categories"] = base
    return converted, [class_name(c["name"]) for c in base], names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_json", type=Path, help="LVIS v1 training annotations (lvis_v1_train.json)")
    parser.add_argument("--out-dir", type=Path, help="where to write (default: next to train_json)")
    parser.add_argument("--epochs", type=int, default=48, help="for the printed max_iters (F-ViT: 48)")
    parser.add_argument("--batch", type=int, default=64, help="global batch for max_iters (F-ViT: 64)")
    args = parser.parse_args(argv)
    if not args.train_json.is_file():
        parser.error(f"{args.train_json} not found (LVIS v1: lvis_v1_train.json from lvisdataset.org)")
    try:
        lvis = json.loads(args.train_json.read_text())
        converted, base, names = base_split(lvis)
    except (ValueError, KeyError, TypeError) as e:
        parser.error(f"{args.train_json}: {e}")
    out = args.out_dir or args.train_json.parent
    # compact, as LVIS ships it (the training file is over 1 GB)
    write_bytes(out / TRAIN_JSON, json.dumps(converted, separators=(",", ":")).encode())
    write_bytes(out / BASE_CLASSES, ("\n".join(base) + "\n").encode())
    write_bytes(out / ALL_CLASSES, ("\n".join(names) + "\n").encode())
    annotated = len({a["image_id"] for a in converted["annotations"]})
    dropped = len(lvis["annotations"]) - len(converted["annotations"])
    print(f"{len(base)} base categories (frequent + common), {len(names) - len(base)} rare left out; "
          f"{len(converted['annotations'])} annotations kept, {dropped} rare ones dropped; "
          f"{annotated} of {len(converted['images'])} images have a base annotation")
    print(f"max_iters for {args.epochs} epochs at global batch {args.batch}: "
          f"{-(-args.epochs * annotated // args.batch)}")
    print(f"wrote {out / TRAIN_JSON}, {out / BASE_CLASSES}, {out / ALL_CLASSES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
