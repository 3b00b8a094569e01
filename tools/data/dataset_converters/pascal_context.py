"""PASCAL Context label maps (60 classes, and with ``--full`` all 459) from the official release.

    python tools/data/dataset_converters/pascal_context.py data/VOCdevkit/VOC2010 trainval/ [--full]

Inputs: the VOC2010 folder (``JPEGImages``, ``ImageSets/Main/{train,val}.txt``) and the folder of
the official ``trainval.tar.gz`` (``trainval/*.mat`` with a ``LabelMap`` of the 459 class ids of
``labels.txt``, 0 = unlabelled, and ``labels.txt`` itself, ``"<id>: <name>"`` per line, in
alphabetical order). Writes into the VOC2010 folder:

* ``SegmentationClassContext/<id>.png`` — 8-bit, 0 background (every pixel outside the 59
  classes, unlabelled included), 1–59 the classes of mmseg's ``PascalContextDataset`` in its
  (alphabetical) order — the maps mmseg's ``pascal_context.py`` makes with the Detail API;
* ``ImageSets/SegmentationContext/{train,val}.txt`` — VOC2010's Main split restricted to the
  annotated images (4998 train and 5105 val images when everything is present);
* with ``--full``: ``SegmentationClassContext459/<id>.png`` (16-bit: class id − 1, 65535 =
  unlabelled) and ``pc459_classnames.txt`` (the names of ``labels.txt`` in label order), for
  ``configs/_base_/datasets/context459.py``.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ovdense.io import write_bytes

# mmseg's PascalContextDataset classes after "background", as labels.txt spells them
CONTEXT59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
IGNORE_16 = 65535


def read_labels(path: Path) -> dict[int, str]:
    """``labels.txt`` → ``{id: name}`` (ids from 1)."""
    labels = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*(\d+)\s*:\s*(.+?)\s*$", line)
        if match:
            labels[int(match.group(1))] = match.group(2)
    if not labels:
        raise SystemExit(f"{path} holds no '<id>: <name>' lines")
    return labels


def context60_table(labels: dict[int, str]) -> np.ndarray:
    """``[max id + 1]`` uint8 lookup: 459-class id → Context-60 label (0 = background)."""
    id_of = {name: i for i, name in labels.items()}
    missing = [name for name in CONTEXT59 if name not in id_of]
    if missing:
        raise SystemExit(f"labels.txt lacks the Context-59 classes {missing}")
    table = np.zeros(max(labels) + 1, np.uint8)
    for label, name in enumerate(CONTEXT59, start=1):
        table[id_of[name]] = label
    return table


def png(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")  # uint8 → 8-bit, uint16 → 16-bit
    return buffer.getvalue()


def label_map(mat_file: Path) -> np.ndarray:
    from scipy.io import loadmat

    return np.asarray(loadmat(str(mat_file))["LabelMap"]).astype(np.int64)  # H, W


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("voc2010", type=Path, help="VOCdevkit/VOC2010")
    parser.add_argument("context", type=Path, help="the unpacked trainval.tar.gz: *.mat files (or trainval/) "
                        "and labels.txt")
    parser.add_argument("--full", action="store_true", help="also write the 459-class maps and class names")
    args = parser.parse_args(argv)
    labels_txt = args.context / "labels.txt"
    mats = args.context / "trainval" if (args.context / "trainval").is_dir() else args.context
    if not labels_txt.is_file():
        parser.error(f"{labels_txt} not found")
    labels = read_labels(labels_txt)
    table = context60_table(labels)
    annotated = set()
    for mat_file in tqdm(sorted(mats.glob("*.mat")), desc="maps", unit="image"):
        ids = label_map(mat_file)
        if ids.min() < 0 or ids.max() >= len(table):
            raise SystemExit(f"{mat_file}: label ids outside labels.txt")
        write_bytes(args.voc2010 / "SegmentationClassContext" / f"{mat_file.stem}.png", png(table[ids]))
        if args.full:
            full = np.where(ids == 0, IGNORE_16, ids - 1).astype(np.uint16)
            write_bytes(args.voc2010 / "SegmentationClassContext459" / f"{mat_file.stem}.png", png(full))
        annotated.add(mat_file.stem)
    for split in ("train", "val"):
        main_split = args.voc2010 / "ImageSets" / "Main" / f"{split}.txt"
        if not main_split.is_file():
            parser.error(f"{main_split} not found")
        ids = [line.strip() for line in main_split.read_text().splitlines() if line.strip() in annotated]
        write_bytes(args.voc2010 / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                    ("\n".join(ids) + "\n").encode())
        print(f"{split}: {len(ids)} annotated images")
    if args.full:
        names = [labels[i] for i in sorted(labels)]
        write_bytes(args.voc2010 / "pc459_classnames.txt", ("\n".join(names) + "\n").encode())
        print(f"{len(names)} class names in {args.voc2010 / 'pc459_classnames.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
