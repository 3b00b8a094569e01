"""Score a CLIPSeg head per prompt on the held-out scenes of the open-vocabulary toy world, beside
training-free maskclip.

    python tools/data/make_synthetic_benchmarks.py --san-toy --out synthetic_san --num-train 2000 --num 100
    python tools/train.py configs/clipseg/clipseg_toy_synthetic.py
    python tools/analysis/eval_clipseg_toy.py --data synthetic_san \\
        --head work_dirs/clipseg_toy_synthetic/clipseg_head.safetensors [--out scores.json]

The scenes are the ADE20K-layout validation split of ``--san-toy`` (label 0 background, ``k`` =
``colour_shape_classes()[k]``); the head was trained on the 20 *base* pairs only
(``synthetic.open_vocabulary_split``). For every scene and every pair it shows, one prompt:

* **text**: the pair's name in the backbone's template; the mask is ``sigmoid(logits) > 0.5``;
* **one-shot**: an image prompt — the next held-out scene (in file order, wrapping) that shows
  the same pair, with that pair's mask, through the official visual prompt engineering;
* **maskclip**: the training-free head segmenting the scene with all 31 classes (background and
  the 30 pairs); the pair's mask is the pixels labelled with it.

Each prompt's binary IoU with the pair's pixels (label 255 ignored) is averaged over the prompts
of base pairs and of novel pairs (a prompt is one pair in one scene). Printed as a table;
``--out FILE`` also writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ovdense.data.synthetic import colour_shape_classes, open_vocabulary_split
from ovdense.errors import OvdenseError
from ovdense.io import load_image, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_san_toy import IGNORE, scenes  # noqa: E402  (a sibling tool: the same held-out split)


def binary_iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """IoU of two boolean masks over the valid pixels (1.0 when both are empty)."""
    union = ((pred | truth) & valid).sum()
    return float(((pred & truth) & valid).sum() / union) if union else 1.0


def evaluate(segmenter, baseline, pairs, progress: bool = True) -> dict:
    """Per-prompt IoUs: ``{"text"|"one-shot"|"maskclip": {"base": [...], "novel": [...]}}``."""
    names = colour_shape_classes()  # background + 30 pairs
    _, novel = open_vocabulary_split()
    loaded = [(load_image(image), np.array(Image.open(labels))) for image, labels in pairs]
    shows = [set(int(k) for k in np.unique(t) if 0 < k < len(names)) for _, t in loaded]
    ious = {kind: {"base": [], "novel": []} for kind in ("text", "one-shot", "maskclip")}
    for s, (rgb, truth) in enumerate(tqdm(loaded, desc="scenes", disable=not progress)):
        present = sorted(shows[s])
        if not present:
            continue
        valid = truth != IGNORE
        text = segmenter.cond[[k - 1 for k in present]]  # the segmenter's prompts are the 30 pairs
        examples = []
        for k in present:
            other = next((o % len(loaded) for o in range(s + 1, s + len(loaded))
                          if k in shows[o % len(loaded)]), None)
            examples.append(None if other is None else
                            segmenter.image_prompt(loaded[other][0], loaded[other][1] == k))
        with torch.inference_mode():
            logits = {"text": segmenter.prompt_logits(rgb, text)}
            shot = [i for i, e in enumerate(examples) if e is not None]
            if shot:
                logits["one-shot"] = segmenter.prompt_logits(rgb, torch.cat([examples[i] for i in shot]))
        labels = baseline.predict(rgb).labels
        for kind, values in logits.items():
            index = list(range(len(present))) if kind == "text" else shot
            up = F.interpolate(values[None], truth.shape, mode="bilinear", align_corners=False)[0]
            masks = (up.sigmoid() > 0.5).cpu().numpy()
            for mask, i in zip(masks, index):
                k = present[i]
                split = "novel" if names[k] in novel else "base"
                ious[kind][split].append(binary_iou(mask, truth == k, valid))
        for k in present:
            ious["maskclip"]["novel" if names[k] in novel else "base"].append(
                binary_iou(labels == k, truth == k, valid))
    return ious


def summarise(ious: dict) -> dict:
    return {kind: {split: (float(np.mean(v)) if v else float("nan"), len(v)) for split, v in parts.items()}
            for kind, parts in ious.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the --out folder of --san-toy")
    parser.add_argument("--head", required=True, help="a CLIPSeg head (clipseg_head.safetensors)")
    parser.add_argument("--num", type=int, default=None, help="only the first NUM scenes")
    parser.add_argument("--out", type=Path, default=None, help="write the scores here as JSON")
    args = parser.parse_args(argv)
    from ovdense import Segmenter, create_backbone
    from ovdense.heads.clipseg import ClipSegSegmenter

    try:
        backbone = create_backbone("toy")
        names = colour_shape_classes()
        segmenter = ClipSegSegmenter(backbone, names[1:], head_checkpoint=args.head)
        baseline = Segmenter(backbone, "maskclip", names)  # as eval_san_toy.py: the toy's own defaults
        scores = summarise(evaluate(segmenter, baseline, scenes(args.data, args.num)))
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'prompt':10} {'IoU base':>10} {'IoU novel':>10}   (prompts: base, novel)")
    for kind, parts in scores.items():
        (b, nb), (n, nn_) = parts["base"], parts["novel"]
        print(f"{kind:10} {100 * b:10.1f} {100 * n:10.1f}   ({nb}, {nn_})")
    if args.out is not None:
        write_json(args.out, {"head": str(args.head), "scenes": len(scenes(args.data, args.num)),
                              "iou": scores})
    return 0


if __name__ == "__main__":
    sys.exit(main())
