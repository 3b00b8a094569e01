"""Score SAN and the training-free heads on the held-out scenes of the open-vocabulary toy world.

    python tools/data/make_synthetic_benchmarks.py --san-toy --out synthetic_san --num-train 2000 --num 100
    python tools/analysis/eval_san_toy.py --data synthetic_san \\
        --head work_dirs/san_toy_synthetic/san_head.safetensors
    python tools/analysis/eval_san_toy.py --data synthetic_san --baselines maskclip sclip naclip  # no --head

Every method segments the same scenes (the ADE20K-layout validation split that ``--san-toy``
writes: label 0 background, ``k`` = ``colour_shape_classes()[k]``) with the same 31 class
names (background + all 30 colour–shape pairs; SAN was trained on background + the 20 *base*
pairs only, ``synthetic.open_vocabulary_split``). Printed per method:

* mIoU (%) over the base pairs, the novel pairs, and all 31 classes (background included),
  from one confusion matrix over all scenes (a class absent from both truth and prediction is
  left out of the mean);
* object-pixel accuracy: over the pixels of objects, the share whose predicted class is the
  right colour–shape pair (all objects, base objects, novel objects) and the share whose
  predicted class has the right colour (any shape).

``--out FILE`` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ovdense.data.synthetic import COLOURS, SHAPES, colour_shape_classes, open_vocabulary_split
from ovdense.errors import OvdenseError
from ovdense.eval.segmentation import ConfusionMatrix
from ovdense.io import write_json

IGNORE = 255


class ToyScores:
    """Accumulates the toy world's scores over scenes (labels in ``colour_shape_classes`` order)."""

    def __init__(self):
        names = colour_shape_classes()
        _, novel = open_vocabulary_split()
        self.novel = np.array([name in novel for name in names])  # [31], False for background
        self.matrix = ConfusionMatrix(len(names), ignore_index=IGNORE)
        self.counts = dict.fromkeys(("all", "base", "novel", "all_right", "base_right", "novel_right",
                                     "colour_right"), 0)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """Add one scene: ``prediction`` and ``truth`` ``[H, W]`` labels (truth 255 ignored)."""
        self.matrix.update(prediction, truth)
        objects = (truth > 0) & (truth != IGNORE)
        p, t = prediction[objects].astype(np.int64), truth[objects].astype(np.int64)
        right = p == t
        novel = self.novel[t]
        same_colour = (p > 0) & ((p - 1) // len(SHAPES) == (t - 1) // len(SHAPES))
        self.counts["all"] += t.size
        self.counts["novel"] += int(novel.sum())
        self.counts["base"] += int((~novel).sum())
        self.counts["all_right"] += int(right.sum())
        self.counts["novel_right"] += int((right & novel).sum())
        self.counts["base_right"] += int((right & ~novel).sum())
        self.counts["colour_right"] += int(same_colour.sum())

    def result(self) -> dict[str, float]:
        iou = self.matrix.scores().iou  # [31], NaN where a class is absent from truth and prediction
        base = ~self.novel
        base[0] = False

        def mean(values):
            values = values[~np.isnan(values)]
            return float(values.mean()) if values.size else float("nan")

        def share(right, total):
            return self.counts[right] / self.counts[total] if self.counts[total] else float("nan")

        return {
            "miou_base": mean(iou[base]), "miou_novel": mean(iou[self.novel]), "miou_all": mean(iou),
            "acc_all": share("all_right", "all"), "acc_base": share("base_right", "base"),
            "acc_novel": share("novel_right", "novel"), "acc_colour": share("colour_right", "all"),
        }


def scenes(data: Path, num: int | None) -> list[tuple[Path, Path]]:
    """``(image, label map)`` pairs of the held-out split under ``--data``."""
    root = data / "data" / "ade" / "ADEChallengeData2016"
    images = sorted((root / "images" / "validation").glob("*.jpg"))
    if not images:
        raise OvdenseError(f"no held-out scenes under {root}: write them with "
                           f"tools/data/make_synthetic_benchmarks.py --san-toy --out {data}")
    pairs = [(p, root / "annotations" / "validation" / f"{p.stem}.png") for p in images]
    return pairs[:num] if num else pairs


def evaluate(segmenter, pairs) -> dict[str, float]:
    scores = ToyScores()
    for image, labels in pairs:
        scores.update(segmenter.predict(image).labels, np.array(Image.open(labels)))
    return scores.result()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True,
                        help="the --out folder of make_synthetic_benchmarks --san-toy")
    parser.add_argument("--head", help="a SAN head (san_head.safetensors from tools/train.py)")
    parser.add_argument("--baselines", nargs="*", default=["maskclip"],
                        help="training-free methods to compare")
    parser.add_argument("--model", default="toy", help="the backbone the head was trained on")
    parser.add_argument("--num", type=int, default=None, help="score only the first NUM scenes")
    parser.add_argument("--out", type=Path, help="write the scores here as JSON")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from ovdense import Segmenter, create_backbone
    from ovdense.heads.san import SanSegmenter

    try:
        pairs = scenes(args.data, args.num)
        backbone = create_backbone(args.model)
        classes = colour_shape_classes()
        methods = {}
        if args.head:
            methods["san"] = lambda: SanSegmenter(backbone, classes, head_checkpoint=args.head)
        for method in args.baselines:
            methods[method] = lambda method=method: Segmenter(backbone, method, classes)
        if not methods:
            raise OvdenseError("nothing to score: give --head and/or --baselines")
        table = {}
        for name, build in tqdm(methods.items(), desc="methods", file=sys.stderr):
            table[name] = evaluate(build(), pairs)
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base, novel = open_vocabulary_split()
    print(f"{len(pairs)} held-out scenes; {len(base)} base and {len(novel)} novel pairs, "
          f"{len(COLOURS)} colours x {len(SHAPES)} shapes")
    columns = ("miou_base", "miou_novel", "miou_all", "acc_all", "acc_base", "acc_novel", "acc_colour")
    print(f"{'method':<10}" + "".join(f"{c:>12}" for c in columns))
    for name, row in table.items():
        print(f"{name:<10}" + "".join(f"{100 * row[c]:>12.1f}" for c in columns))
    if args.out:
        write_json(args.out, {"scenes": len(pairs), "scores": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
