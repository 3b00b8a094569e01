"""Score a detection head through the user's path (``Detector``, plain torch) on the toy's held-out scenes.

    python tools/data/make_synthetic_detection.py --out synthetic/detection --num-train 2000 --num 100
    python tools/analysis/eval_detect_toy.py --data synthetic/detection        # the shipped toy head
    python tools/analysis/eval_detect_toy.py --data synthetic/detection \\
        --head work_dirs/.../fvit_head.safetensors

Every held-out scene (``coco/val2017``, all 30 colour–shape pairs labelled) goes through
``ovdense.heads.fvit.Detector`` with the 30 pair names as the vocabulary (20 seen in training,
10 never: they get F-ViT's β), score threshold 0, once with F-ViT's CLIP ensemble and once without
(the detector's own scores). pycocotools' ``COCOeval`` scores the boxes and masks; printed per run:
box AP50 over all pairs, the base pairs and the novel pairs (the mean over those categories of
COCO's precision at IoU 0.5, as mmdet's ``OVCocoMetric``), box AP and mask AP / AP50 over all.
``tools/test.py configs/ovdet/fvlm_toy_synthetic.py --checkpoint …`` gives the same figures through
mmdet from a training checkpoint; this tool checks the head file users get. ``--out FILE`` writes JSON.

``--beta 0 0.2 0.4 0.6 0.8`` also sweeps F-ViT's β (the CLIP term's exponent for the pairs not seen
in training; the head file's own is 0.8): box AP50 over all, base and novel pairs at each β, by
the same scoring (``tools/test.py … --cfg-options model.roi_head.bbox_head.beta=β`` reports mmdet's
``coco/novel_ap50``, which mmdet 3.3 overwrites with the mask pass's when both are evaluated).
``--temperature 25 50 100`` sweeps the CLIP term's softmax temperature (``vlm_temperature``; the toy
head's own is the toy CLIP's logit scale) the same way, crossed with ``--beta`` when both are given.
Choose such settings on scenes other than those reported (``make_synthetic_detection.py --seed 1``
writes a validation world), as ``docs/clipself.md`` does.

``--model toy-clipself`` scores the heads of the CLIPSelf-refined toy (its shipped head by default).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import numpy as np


def ap50_by_category(evaluator) -> dict[int, float]:
    """COCO precision at IoU 0.5, all areas, 100 detections, per category id (``-1``: no truth)."""
    precision = evaluator.eval["precision"]  # T, R, K, A, M
    t = int(np.argmin(np.abs(evaluator.params.iouThrs - 0.5)))
    out = {}
    for k, category in enumerate(evaluator.params.catIds):
        p = precision[t, :, k, 0, -1]
        p = p[p > -1]
        out[category] = float(p.mean()) if p.size else -1.0
    return out


def evaluate(truth, results: list[dict], kind: str, novel_ids: set[int]) -> dict:
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict(ap=0.0, ap50=0.0, base_ap50=0.0, novel_ap50=0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(truth, truth.loadRes(results), kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    per = ap50_by_category(evaluator)

    def mean(ids):
        values = [per[i] for i in ids if per[i] > -1]
        return float(np.mean(values)) if values else float("nan")

    return dict(ap=float(evaluator.stats[0]), ap50=float(evaluator.stats[1]),
                base_ap50=mean([i for i in per if i not in novel_ids]),
                novel_ap50=mean(list(novel_ids & set(per))))


def load_held_out(data: Path):
    """The held-out scenes' truth (``pycocotools.coco.COCO``) and its categories sorted by id, or
    ``None`` after printing what to run when ``data`` holds no toy detection world."""
    from pycocotools.coco import COCO

    annotations = data / "coco" / "annotations" / "instances_val2017.json"
    if not annotations.is_file():
        print(f"error: {annotations} not found: run tools/data/make_synthetic_detection.py --out {data}",
              file=sys.stderr)
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
    return truth, sorted(truth.loadCats(truth.getCatIds()), key=lambda c: c["id"])


def add_world_and_head_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments this tool shares with ``fvit_toy_regions.py``: the toy detection world (and its
    split) and the head with the toy backbone it was trained on."""
    from ovdense.data.synthetic import SHAPES

    parser.add_argument("--data", type=Path, default=Path("synthetic/detection"))
    parser.add_argument("--model", default="toy", choices=["toy", "toy-clipself"],
                        help="the toy backbone the head was trained on")
    parser.add_argument("--head", help="head file (default: the model's shipped head)")
    parser.add_argument("--pretrained", help="toy backbone weights the head was trained on (a CLIPSelf-"
                        "refined toy: WORK_DIR/clipself_backbone.safetensors; default: the shipped toy)")
    parser.add_argument("--novel-shape", choices=list(SHAPES),
                        help="the world was written by make_synthetic_detection.py --novel-shape SHAPE: "
                        "that shape's pairs are the novel ones")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_head_arguments(parser)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--beta", type=float, nargs="+", metavar="B",
                        help="also sweep F-ViT's beta over these values (box AP50 with the CLIP term)")
    parser.add_argument("--temperature", type=float, nargs="+", metavar="T",
                        help="also sweep the CLIP term's softmax temperature over these values")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    import ovdense
    from ovdense.data import rle
    from ovdense.data.synthetic import open_vocabulary_split
    from ovdense.errors import OvdenseError
    from ovdense.heads.fvit import Detector

    held_out = load_held_out(args.data)
    if held_out is None:
        return 2
    truth, categories = held_out
    names = [c["name"] for c in categories]
    _, novel = open_vocabulary_split(args.novel_shape)
    novel_ids = {c["id"] for c in categories if c["name"] in novel}
    backbone = ovdense.create_backbone(args.model, pretrained=args.pretrained)
    report = {}

    def detections(detector, desc: str) -> tuple[list[dict], list[dict]]:
        boxes, masks = [], []
        for image in tqdm(truth.loadImgs(truth.getImgIds()), desc=desc, unit="img"):
            r = detector.predict(args.data / "coco" / "val2017" / image["file_name"])
            for k in range(len(r.scores)):
                x1, y1, x2, y2 = (float(v) for v in r.boxes[k])
                row = dict(image_id=image["id"], category_id=categories[int(r.class_ids[k])]["id"],
                           bbox=[x1, y1, x2 - x1, y2 - y1], score=float(r.scores[k]))
                boxes.append(row)
                if r.masks is not None:
                    masks.append({**row, "segmentation": rle.encode(r.masks[k])})
        return boxes, masks

    detectors = {}
    for ensemble in (True, False):
        try:
            detector = detectors[ensemble] = Detector(backbone, names, head_checkpoint=args.head,
                                                      score_threshold=0.0, ensemble=ensemble)
        except OvdenseError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        boxes, masks = detections(detector, f"ensemble={ensemble}")
        name = "with CLIP term" if ensemble else "without CLIP term"
        report[name] = dict(bbox=evaluate(truth, boxes, "bbox", novel_ids),
                            segm=evaluate(truth, masks, "segm", novel_ids) if masks else None)
    print(f"{'':20s} {'AP50 all':>9s} {'AP50 base':>10s} {'AP50 novel':>11s} {'AP':>6s} {'mask AP':>8s} "
          f"{'mask AP50':>10s}")
    for name, scores in report.items():
        b, s = scores["bbox"], scores["segm"] or dict(ap=float("nan"), ap50=float("nan"))
        print(f"{name:20s} {b['ap50']:9.3f} {b['base_ap50']:10.3f} {b['novel_ap50']:11.3f} {b['ap']:6.3f} "
              f"{s['ap']:8.3f} {s['ap50']:10.3f}")
    sweep = {}
    if args.beta or args.temperature:
        detector = detectors[True]  # the ensemble run's, its β and temperature set in turn
        head = detector.model.roi_head.bbox_head
        for beta in args.beta or [head.beta]:
            for temperature in args.temperature or [head.vlm_temperature]:
                head.beta, head.vlm_temperature = beta, temperature
                key = f"beta={beta:g} T={temperature:g}"
                boxes, _ = detections(detector, key)
                sweep[key] = evaluate(truth, boxes, "bbox", novel_ids)
        report["sweep (box)"] = sweep
    for key, b in sweep.items():
        print(f"{key:20s} {b['ap50']:9.3f} {b['base_ap50']:10.3f} {b['novel_ap50']:11.3f} {b['ap']:6.3f}")
    if args.out:
        from ovdense.io import write_json

        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
