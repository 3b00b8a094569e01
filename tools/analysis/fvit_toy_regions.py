"""Who names the toy's objects better: the trained detection head, or F-ViT's CLIP term?

    python tools/data/make_synthetic_detection.py --out synthetic/detection --num-train 2000 --num 100
    python tools/analysis/fvit_toy_regions.py --data synthetic/detection [--head FILE] \\
        [--methods maskclip sclip]

F-VLM's test-time ensemble (``heads.fvit.ensemble``, ``det^(1−β) · vlm^β`` for classes
outside the training vocabulary) can only lift novel AP where the CLIP term names novel objects
better than the detector does. This tool measures both on the ground-truth boxes of the held-out
scenes (``coco/val2017``, all 30 colour–shape pairs), so localisation plays no part: every box goes
to the head's RoI classifier (the detector's own probabilities, ``ensemble=False``), to the CLIP
term of each training-free method (the 1×1 RoIAlign on the dense CLIP map of
``heads.fvit.frozen_features``: F-ViT's single pass over the whole scene, and the same map
averaged over the backbone's native sliding windows — for the toy, 64 px windows at stride 32,
where objects have the pixel size the toy CLIP was trained on), and to the ensemble of the two
with the head's own α, β and CLIP temperature. Printed per scorer: the share of base boxes and of
novel boxes whose pair is the top-scoring of the 30, and for the novel boxes the share whose
colour and whose shape are right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_detect_toy import add_world_and_head_arguments, load_held_out  # noqa: E402  (a sibling tool)


def windowed_clip_map(backbone, x, indices, method: str, crop: int, stride: int):
    """The dense CLIP map ``[B, D, h, w]`` averaged over sliding windows (``window_boxes``, mmseg's
    layout) of ``crop`` pixels, each run as its own frozen pass; cells covered by several windows
    get the mean of their embeddings, re-normalised. ``crop`` ≥ the image: the single pass."""
    import torch.nn.functional as F

    from ovdense.heads.fvit import frozen_features
    from ovdense.heads.training_free import window_boxes

    p = backbone.patch_size
    H, W = x.shape[-2:]
    total = count = None
    for y1, y2, x1, x2 in window_boxes(H, W, crop, stride):
        clip_map = frozen_features(backbone, x[:, :, y1:y2, x1:x2], indices, method).clip_map  # B, D, hw, ww
        if total is None:
            total = clip_map.new_zeros(*clip_map.shape[:2], H // p, W // p)
            count = clip_map.new_zeros(1, 1, H // p, W // p)
        total[:, :, y1 // p:y2 // p, x1 // p:x2 // p] += clip_map
        count[:, :, y1 // p:y2 // p, x1 // p:x2 // p] += 1
    return F.normalize(total / count, dim=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_and_head_arguments(parser)
    parser.add_argument("--methods", nargs="+", help="dense methods (default: all the toy tower runs)")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    import ovdense
    from ovdense.backbone import dense
    from ovdense.data.synthetic import SHAPES, colour_shape_classes, open_vocabulary_split
    from ovdense.errors import OvdenseError
    from ovdense.heads.fvit import (
        Detector,
        ensemble,
        frozen_features,
        region_clip_embeddings,
        vlm_probabilities,
    )
    from ovdense.io import load_image

    held_out = load_held_out(args.data)
    if held_out is None:
        return 2
    truth, categories = held_out
    names = [c["name"] for c in categories]
    if names != colour_shape_classes()[1:]:
        print(f"error: {args.data} is not the toy detection world (its categories are not the 30 "
              "colour–shape pairs in order): write it with tools/data/make_synthetic_detection.py",
              file=sys.stderr)
        return 2
    index = {c["id"]: k for k, c in enumerate(categories)}
    _, novel_names = open_vocabulary_split(args.novel_shape)
    backbone = ovdense.create_backbone(args.model, pretrained=args.pretrained)
    depth = backbone.num_layers
    methods = args.methods or [m for m, spec in dense.METHODS.items()
                               if all(c < depth - 1 for c in spec.capture)]  # those the toy's 6 blocks run
    unknown = [m for m in methods if m not in dense.METHODS]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}; choose from: {', '.join(dense.METHODS)}",
              file=sys.stderr)
        return 2
    try:
        detector = Detector(backbone, names, head_checkpoint=args.head, score_threshold=0.0, ensemble=False)
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, head = detector.model, detector.model.roi_head.bbox_head
    columns = head.classifier.columns(detector.text)  # C+1, D
    crop, stride = backbone.defaults.get("window") or (10 ** 6, 10 ** 6)
    passes = {"one pass": None, f"windows {crop}/{stride}": (crop, stride)}

    scores: dict[str, list] = {"detector head (no CLIP term)": []}
    for method in methods:
        for mode in passes:
            scores[f"CLIP term, {method}, {mode}"] = []
            scores[f"ensemble, {method}, {mode}"] = []
    labels = []
    for image in tqdm(truth.loadImgs(truth.getImgIds()), desc="scenes", unit="img"):
        anns = truth.loadAnns(truth.getAnnIds(imgIds=image["id"], iscrowd=False))
        if not anns:
            continue
        x, meta = detector.preprocess(load_image(args.data / "coco" / "val2017" / image["file_name"]))
        sx, sy = meta["scale_factor"]
        boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                               (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns])  # R, 4 (input pixels)
        rois = torch.cat([boxes.new_zeros(len(anns), 1), boxes], dim=1)  # R, 5
        labels += [index[a["category_id"]] for a in anns]
        with torch.no_grad():
            feats, _ = model.features(x, with_clip_map=False)
            det, _ = head(model.bbox_roi_extractor(feats[:model.bbox_roi_extractor.num_inputs], rois),
                          detector.text, detector.seen, None)  # R, C+1
            scores["detector head (no CLIP term)"].append(det)
            for method in methods:
                for mode, window in passes.items():
                    if window is None:
                        clip_map = frozen_features(backbone, x, model.indices, method).clip_map
                    else:
                        clip_map = windowed_clip_map(backbone, x, model.indices, method, *window)
                    vlm = vlm_probabilities(region_clip_embeddings(clip_map, rois, backbone.patch_size),
                                            columns, head.vlm_temperature)
                    scores[f"CLIP term, {method}, {mode}"].append(vlm)
                    scores[f"ensemble, {method}, {mode}"].append(
                        ensemble(det, vlm, detector.seen, head.alpha, head.beta))
    if not labels:
        print(f"error: the held-out scenes of {args.data} have no objects", file=sys.stderr)
        return 2
    labels = np.array(labels)
    novel = np.array([names[k] in novel_names for k in labels])
    width = max(len(k) for k in scores)
    print(f"{len(labels)} ground-truth boxes in {len(truth.getImgIds())} scenes ({int(novel.sum())} novel); "
          f"ensemble: α {head.alpha}, β {head.beta}, CLIP temperature {head.vlm_temperature:.1f}")
    print(f"{'scorer':{width}s} {'base':>6s} {'novel':>6s} {'novel colour':>13s} {'novel shape':>12s}")
    for name, rows in scores.items():
        guess = torch.cat(rows)[:, :-1].argmax(dim=1).numpy()  # the background column never names a box
        right = guess == labels
        colour = guess // len(SHAPES) == labels // len(SHAPES)
        shape = guess % len(SHAPES) == labels % len(SHAPES)
        print(f"{name:{width}s} {right[~novel].mean():6.3f} {right[novel].mean():6.3f} "
              f"{colour[novel].mean():13.3f} {shape[novel].mean():12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
