"""Write the eight training-free benchmarks as synthetic datasets, each at its config's
``data_root`` under ``--out``, with a class file per benchmark naming the synthetic classes.

    python tools/data/make_synthetic_benchmarks.py --out synthetic --num 10
    python tools/benchmarks/table.py --data-root-prefix synthetic --classnames-dir synthetic/classnames \\
        --cfg-options model.backbone.name=toy --out synthetic/table.md

Every benchmark gets the files, names and label encoding of its real layout
(``ovdense.data.layouts``): ``data/VOCdevkit/VOC2012`` (VOC21 and VOC20),
``data/VOCdevkit/VOC2010`` (Context60 and Context59, VOC's scenes under Context's folder names),
``data/coco_stuff164k`` (COCO-Stuff-171, and COCO-Object's ``*_instanceTrainIds.png`` written
from a COCO instances json by ``tools/data/dataset_converters/coco_object.py``),
``data/cityscapes`` and ``data/ade/ADEChallengeData2016``. Labels are the synthetic world's
classes (0 background, then the 30 colour–shape pairs); labels beyond a benchmark's class
count are marked ignored (255), as VOC's 21 and Cityscapes' 19 classes require.

``classnames/<benchmark>.txt`` has one line per class of the benchmark, in label order after
mmseg's ``reduce_zero_label``: the world's class names, then ``unused class k`` for the classes
the world lacks — so a model that knows the world (the toy CLIP) is scored on what it knows.

``--san-toy`` writes instead the open-vocabulary toy world of SAN (``configs/san/san_toy_synthetic.py``):

    python tools/data/make_synthetic_benchmarks.py --san-toy --out synthetic_san --num-train 2000 --num 100

* ``data/coco_stuff164k`` (COCO-Stuff layout), ``--num-train`` training scenes per split whose
  labels index ``configs/_base_/classnames/toy_base.txt`` (0 background, then the 20 *base*
  colour–shape pairs); novel pairs are ignored (255) — training never sees them;
* ``data/ade/ADEChallengeData2016`` (ADE20K layout), ``--num`` held-out scenes per split (other
  seeds) with all 30 pairs (label ``k`` = ``colour_shape_classes()[k]``, 0 background, read
  without ``reduce_zero_label``; ``configs/_base_/classnames/toy_all.txt``).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ovdense.data.layouts import write_dataset
from ovdense.data.synthetic import base_labels, colour_shape_classes
from ovdense.io import write_bytes, write_label_png

CONVERTERS = Path(__file__).resolve().parent / "dataset_converters"  # tools/data/dataset_converters
IGNORE = 255

# benchmark → (number of classes, whether mmseg reduces label 0 away)
BENCHMARKS = {
    "voc21": (21, False),
    "context60": (60, False),
    "coco_object": (81, False),
    "voc20": (20, True),
    "context59": (59, True),
    "coco_stuff": (171, False),
    "cityscapes": (19, False),
    "ade150": (150, True),
}


def _ignore_above(path: Path, limit: int, palette: bool) -> None:
    """Mark labels ``> limit`` as ignored (255) in a label PNG, in its own encoding."""
    labels = np.array(Image.open(path))
    labels[(labels > limit) & (labels != IGNORE)] = IGNORE
    if palette:
        write_label_png(path, labels)
    else:
        Image.fromarray(labels.astype(np.uint8)).save(path)


def _coco_object_converter():
    path = CONVERTERS / "coco_object.py"
    spec = importlib.util.spec_from_file_location("ovdense_tools_coco_object", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def class_names(benchmark: str) -> list[str]:
    """One name per class of ``benchmark``, in label order (after ``reduce_zero_label``)."""
    count, reduce_zero = BENCHMARKS[benchmark]
    world = colour_shape_classes()[1:] if reduce_zero else colour_shape_classes()
    return world[:count] + [f"unused class {k}" for k in range(len(world), count)]


def write_benchmarks(out: Path, num: int, seed: int = 0, size: int = 128) -> dict[str, Path]:
    """Write all eight benchmarks under ``out``; return ``{benchmark: data_root}``."""
    data = out / "data"
    roots = {}
    roots["ade150"] = write_dataset("ade20k", data / "ade", num, seed=seed + 1, size=size)
    stuff = write_dataset("coco-stuff", data, num, seed=seed + 2, size=size)
    # COCO-Object: the same scenes as instances json, converted into the COCO-Stuff folder
    coco = write_dataset("coco-instances", out / "raw", num, seed=seed + 2, size=size)
    if _coco_object_converter().main([str(coco), "--out", str(stuff), "--copy"]) != 0:
        raise RuntimeError("the COCO-Object converter failed")
    roots.update(coco_stuff=stuff, coco_object=stuff)
    city = write_dataset("cityscapes", data, num, seed=seed + 4, size=size)
    for path in (city / "gtFine").rglob("*_labelTrainIds.png"):
        _ignore_above(path, BENCHMARKS["cityscapes"][0] - 1, palette=False)
    roots["cityscapes"] = city
    voc = write_dataset("voc", data, num, seed=seed + 5, size=size)
    context = data / "VOCdevkit" / "VOC2010"  # PASCAL Context: VOC's folders, its own names
    for src, dst in (("JPEGImages", "JPEGImages"), ("SegmentationClass", "SegmentationClassContext"),
                     ("ImageSets/Segmentation", "ImageSets/SegmentationContext")):
        shutil.copytree(voc / src, context / dst, dirs_exist_ok=True)
    for path in (voc / "SegmentationClass").glob("*.png"):
        _ignore_above(path, BENCHMARKS["voc21"][0] - 1, palette=True)
    roots.update(voc21=voc, voc20=voc, context60=context, context59=context)
    for benchmark in BENCHMARKS:
        text = "\n".join(class_names(benchmark)) + "\n"
        write_bytes(out / "classnames" / f"{benchmark}.txt", text.encode())
    return roots


def write_san_toy(out: Path, num_train: int, num_val: int, seed: int = 0, size: int = 128) -> dict[str, Path]:
    """The SAN toy world under ``out``: ``{"train": COCO-Stuff root (base labels),
    "eval": ADE20K root (all pairs)}``; seeds differ from ``write_benchmarks``'s and between
    the two, so evaluation scenes are held out."""
    data = out / "data"
    train = write_dataset("coco-stuff", data, num_train, seed=seed + 10, size=size)
    mapping = base_labels(IGNORE)
    for path in (train / "annotations").rglob("*_labelTrainIds.png"):
        labels = mapping[np.array(Image.open(path))]
        write_bytes(path, _png_bytes(labels.astype(np.uint8)))
    evaluation = write_dataset("ade20k", data / "ade", num_val, seed=seed + 11, size=size)
    return {"train": train, "eval": evaluation}


def _png_bytes(labels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write data/ and classnames/ in")
    parser.add_argument("--num", type=int, default=10, help="images per split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--san-toy", action="store_true",
                        help="write SAN's open-vocabulary toy world instead (base-only training set, "
                             "held-out evaluation set with every pair)")
    parser.add_argument("--num-train", type=int, default=2000, help="training scenes with --san-toy")
    args = parser.parse_args(argv)
    if args.num <= 0 or args.num_train <= 0:
        parser.error("--num and --num-train must be positive")
    if args.san_toy:
        for part, root in write_san_toy(args.out, args.num_train, args.num, args.seed, args.size).items():
            print(f"{part:>12}: {root}")
        return 0
    for benchmark, root in write_benchmarks(args.out, args.num, args.seed, args.size).items():
        print(f"{benchmark:>12}: {root}")
    print(f"class files in {args.out / 'classnames'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
