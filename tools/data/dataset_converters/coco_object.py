"""COCO-Object label maps from COCO's instance annotations.

    python tools/data/dataset_converters/coco_object.py data/coco --out data/coco_stuff164k

Reads ``COCO/annotations/instances_<split>.json`` and writes, per image,
``OUT/annotations/<split>/<stem>_instanceTrainIds.png`` (8-bit: 0 background, 1–80 COCO's thing
classes in category-id order, the classes of ``COCOObjectDataset``), and links the images into
``OUT/images/<split>/`` (``--copy`` copies them). Masks are painted in annotation order, a later
one over an earlier one, crowd regions left out unless ``--include-crowd`` (the rule of the
COCO-Stuff API's ``cocoSegmentationToSegmentationMap``). Polygons need pycocotools; RLE does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ovdense.data import rle
from ovdense.io import write_bytes

SUFFIX = "_instanceTrainIds.png"


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """``[H, W]`` bool mask of a COCO ``segmentation`` (polygons, RLE or compressed RLE)."""
    if isinstance(segmentation, dict):  # RLE, compressed (str) or not (list)
        size = segmentation.get("size", [height, width])
        return rle.decode({"size": size, "counts": segmentation["counts"]})
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise SystemExit("polygon annotations need pycocotools: pip install pycocotools") from e
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles).astype(bool)


def label_maps(instances: dict, include_crowd: bool = False):
    """Yield ``(image record, [H, W] uint8 labels)`` for every image of a COCO instances file."""
    category_ids = sorted(c["id"] for c in instances["categories"])
    if len(category_ids) > 255:
        raise SystemExit(f"{len(category_ids)} categories do not fit an 8-bit label map")
    label_of = {cid: index + 1 for index, cid in enumerate(category_ids)}
    by_image: dict[int, list[dict]] = {}
    for annotation in instances["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in instances["images"]:
        labels = np.zeros((image["height"], image["width"]), np.uint8)  # H, W
        for annotation in by_image.get(image["id"], []):
            if annotation.get("iscrowd", 0) and not include_crowd:
                continue
            mask = annotation_mask(annotation["segmentation"], image["height"], image["width"])
            labels[mask] = label_of[annotation["category_id"]]
        yield image, labels


def png(labels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    return buffer.getvalue()


def place_image(source: Path, target: Path, copy: bool) -> None:
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(source, target)
    else:
        os.symlink(source.resolve(), target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("coco", type=Path,
                        help="COCO root: annotations/instances_<split>.json, <split>/*.jpg")
    parser.add_argument("--out", type=Path, default=Path("data/coco_stuff164k"))
    parser.add_argument("--splits", nargs="+", default=["val2017"])
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("--include-crowd", action="store_true", help="paint crowd regions too")
    args = parser.parse_args(argv)
    for split in args.splits:
        annotation_file = args.coco / "annotations" / f"instances_{split}.json"
        if not annotation_file.is_file():
            parser.error(f"{annotation_file} not found")
        instances = json.loads(annotation_file.read_text())
        count = 0
        maps = label_maps(instances, args.include_crowd)
        for image, labels in tqdm(maps, total=len(instances["images"]), desc=split, unit="image"):
            stem = Path(image["file_name"]).stem
            write_bytes(args.out / "annotations" / split / f"{stem}{SUFFIX}", png(labels))
            name = image["file_name"]
            place_image(args.coco / split / name, args.out / "images" / split / name, args.copy)
            count += 1
        print(f"{split}: {count} label maps in {args.out / 'annotations' / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
