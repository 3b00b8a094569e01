"""COCO-Stuff-171 train ids from the COCO-Stuff 164k ``stuffthingmaps``.

    python tools/data/dataset_converters/coco_stuff.py data/coco_stuff164k --splits val2017

The maps (``stuffthingmaps_trainval2017.zip``, unpacked into ``ROOT/annotations/<split>/``) hold
COCO category id − 1 per pixel (0–181) and 255 for unlabelled. COCO never annotated 11 of its
182 ids (street sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair
brush); dropping them numbers the remaining 171 classes 0–170, the classes of mmseg's
``COCOStuffDataset``. Writes ``<stem>_labelTrainIds.png`` beside each map. The same mapping as
mmseg's ``coco_stuff164k.py``, without its requirement that both full splits be present.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ovdense.io import write_bytes

# COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 and 91, minus 1
UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
NUM_IDS = 182
IGNORE = 255


def train_id_table() -> np.ndarray:
    """``[256]`` uint8 lookup: stuffthingmap value → COCO-Stuff-171 train id (255 = ignored)."""
    table = np.full(256, IGNORE, np.uint8)
    used = [v for v in range(NUM_IDS) if v not in UNUSED]
    table[used] = np.arange(len(used), dtype=np.uint8)
    return table


def convert(path: Path, table: np.ndarray) -> Path:
    labels = table[np.asarray(Image.open(path))]  # H, W
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    return write_bytes(path.with_name(path.stem + "_labelTrainIds.png"), buffer.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="coco_stuff164k folder with annotations/<split>/*.png")
    parser.add_argument("--splits", nargs="+", default=["val2017"])
    args = parser.parse_args(argv)
    table = train_id_table()
    for split in args.splits:
        folder = args.root / "annotations" / split
        maps = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("TrainIds"))
        if not maps:
            parser.error(f"no stuffthingmaps in {folder}")
        for path in tqdm(maps, desc=split, unit="map"):
            convert(path, table)
        print(f"{split}: {len(maps)} maps converted in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
