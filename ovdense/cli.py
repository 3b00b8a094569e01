"""The ``ovdense`` command line: argument parsing and printing only; the work is the API's.

    ovdense segment IMAGE... | DIR --classes "cat,dog,grass" [--method clearclip] ...
    ovdense segment IMAGE... | DIR --classes ... --method sam-clip --sam-checkpoint sam_vit_b_01ec64.pth
    ovdense methods
    ovdense anomaly IMAGE... | DIR --object bottle [--reference DIR --shots K]
    ovdense anomaly-eval --dataset mvtec|visa --root DIR [--shots K]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ovdense.errors import OvdenseError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovdense", description="Open-vocabulary dense prediction on a CLIP backbone."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser(
        "segment",
        help="segment images with any list of words",
        description="Segment images with a training-free method. For each image writes "
        "<stem>_labels.png (indexed, with a palette), <stem>_overlay.jpg and <stem>.json.",
    )
    seg.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    vocab = seg.add_mutually_exclusive_group(required=True)
    vocab.add_argument(
        "--classes",
        help="comma-separated classes; synonyms of one class joined by '|' (person|man|woman)",
    )
    vocab.add_argument(
        "--classes-file", type=Path, help="one class per line, synonyms separated by commas"
    )
    seg.add_argument("--method", default="clearclip",
                     help="see `ovdense methods`, or 'sam-clip' (SAM masks classified by CLIP)")
    seg.add_argument(
        "--model", default="ViT-B-16", help="open_clip model name, 'toy', or a JSON model config"
    )
    seg.add_argument(
        "--pretrained",
        help="open_clip tag or checkpoint file; 'none' = random weights (default: 'openai' for "
        "open_clip models, the embedded weights for 'toy', random for a JSON config)",
    )
    seg.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    seg.add_argument(
        "--templates",
        help="'imagenet80' (default), 'single', or a file of templates (the toy model: its own)",
    )
    seg.add_argument(
        "--window", type=int, nargs=2, metavar=("CROP", "STRIDE"),
        help="sliding window size and stride in pixels (0 0 = one pass over the whole image)",
    )
    seg.add_argument("--short-side", type=int, help="resize the short side to this (0 = keep)")
    seg.add_argument("--logit-scale", type=float, help="softmax temperature factor")
    seg.add_argument(
        "--bg-threshold", type=float,
        help="pixels whose best probability is below this become class 0 (background)",
    )
    seg.add_argument(
        "--area-threshold", type=float,
        help="drop classes (other than 0) covering at most this fraction of the non-background pixels",
    )
    pamr = seg.add_mutually_exclusive_group()
    pamr.add_argument("--pamr", dest="pamr", action="store_true", default=None,
                      help="refine with PAMR")
    pamr.add_argument("--no-pamr", dest="pamr", action="store_false")
    seg.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    seg.add_argument(
        "--kernel", default="auto", choices=("auto", "torch", "triton", "reference"),
        help="the last step's path; 'reference' keeps the plain full-resolution logits",
    )
    _add_sam_clip_arguments(seg)

    sub.add_parser("methods", help="list the training-free methods and their defaults")

    anomaly = sub.add_parser(
        "anomaly", help="defect heat maps with WinCLIP (zero-shot) or WinCLIP+ (few-shot)",
        description="For each image writes <stem>_anomaly.npy (float32 map), "
        "<stem>_heatmap.png (overlay) and <stem>_anomaly.json (image score).",
    )
    anomaly.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    anomaly.add_argument("--object", required=True, help="what the images show, e.g. bottle")
    anomaly.add_argument("--reference", type=Path, help="folder of normal images (WinCLIP+)")
    anomaly.add_argument("--shots", type=int, default=1, help="reference images to use")
    _add_anomaly_model_arguments(anomaly)
    anomaly.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")

    evaluation = sub.add_parser("anomaly-eval", help="WinCLIP metrics on MVTec AD or VisA")
    evaluation.add_argument("--dataset", required=True, choices=("mvtec", "visa"))
    evaluation.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    evaluation.add_argument("--shots", type=int, default=0, help="0 = zero-shot WinCLIP")
    evaluation.add_argument("--categories", nargs="+", help="default: all")
    _add_anomaly_model_arguments(evaluation)
    evaluation.add_argument("--out", type=Path, default=Path("outputs"), help="where the CSV and picture go")
    return parser


def _add_sam_clip_arguments(seg: argparse.ArgumentParser) -> None:
    sam = seg.add_argument_group(
        "SAM + CLIP (--method sam-clip)",
        "SAM's automatic masks, each classified from one dense CLIP pass; writes <stem>_labels.png, "
        "<stem>_overlay.jpg (mask outlines and labels) and <stem>_instances.json (COCO results, RLE)",
    )
    sam.add_argument("--sam-checkpoint", type=Path, help="SAM weights, e.g. sam_vit_b_01ec64.pth")
    sam.add_argument("--sam-model", choices=("vit_b", "vit_l", "vit_h"),
                     help="SAM model type (default: read from the checkpoint's file name)")
    sam.add_argument("--clip-method", help="dense CLIP method whose features are pooled (default clearclip)")
    sam.add_argument("--points-per-side", type=int, help="SAM's point grid (default 32)")
    sam.add_argument("--pred-iou-thresh", type=float, help="SAM's predicted-IoU filter (default 0.88)")
    sam.add_argument("--stability-score-thresh", type=float, help="SAM's stability filter (default 0.95)")
    sam.add_argument("--box-nms-thresh", type=float, help="SAM's box NMS IoU (default 0.7)")
    sam.add_argument("--min-mask-region-area", type=int,
                     help="SAM's clean-up of holes and islands smaller than this (pixels; default 0 = off)")
    sam.add_argument("--unknown-threshold", type=float,
                     help="masks whose best class probability is below this are 'unknown' (their pixels 0)")
    sam.add_argument("--crop-area", type=float,
                     help="blend masks smaller than this fraction of the image with their masked crop's "
                     "CLIP embedding (default off: one CLIP pass)")
    sam.add_argument("--crop-weight", type=float, help="weight of the crop embedding (default 0.5)")


SAM_CLIP = "sam-clip"
SAM_SEGMENTER_OPTIONS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                         "min_mask_region_area", "unknown_threshold", "crop_area", "crop_weight")
SAM_OPTIONS = ("sam_checkpoint", "sam_model", "clip_method", *SAM_SEGMENTER_OPTIONS)
DENSE_ONLY_OPTIONS = ("window", "area_threshold", "bg_threshold", "pamr")


def _check_method_options(args: argparse.Namespace) -> None:
    """Options of one kind of method given to the other are a usage error, not silently ignored."""
    if args.method == SAM_CLIP:
        given = [name for name in DENSE_ONLY_OPTIONS if getattr(args, name) is not None]
        given += ["kernel"] if args.kernel != "auto" else []
        hint = " (SAM + CLIP uses --unknown-threshold)"
    else:
        given = [name for name in SAM_OPTIONS if getattr(args, name) is not None]
        hint = ""
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise OvdenseError(f"{flags}: not an option of --method {args.method}{hint}")


def _add_anomaly_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip ViT, 'toy' or a JSON config")
    parser.add_argument("--pretrained", help="tag or file (default: laion400m_e31, the paper's)")
    parser.add_argument("--prompt-set", default="paper", choices=("paper", "anomalib"))
    parser.add_argument("--device", default="cpu")


def _parse_cli_classes(text: str) -> list[list[str]]:
    classes = [[w.strip() for w in item.split("|") if w.strip()] for item in text.split(",")]
    classes = [c for c in classes if c]
    if not classes:
        raise OvdenseError("the class list is empty: give at least one class, e.g. --classes cat,dog")
    return classes


def _read_templates(value: str | None):
    if value is None:
        return None
    path = Path(value)
    if value in ("imagenet80", "single") or not path.suffix:
        return value
    if not path.is_file():
        raise OvdenseError(f"template file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _command_methods() -> int:
    from ovdense.backbone.dense import METHODS

    print(f"{'method':<10} {'short side':>10} {'window':>9} {'logit scale':>11} {'pamr':>5}  paper")
    for name, spec in METHODS.items():
        p = spec.protocol
        window = f"{p.window[0]}/{p.window[1]}"
        print(f"{name:<10} {p.short_side:>10} {window:>9} {p.logit_scale:>11g} "
              f"{'on' if p.pamr else 'off':>5}  {spec.paper}")
    return 0


def _command_segment(args: argparse.Namespace) -> int:

    from ovdense import Segmenter, create_backbone
    from ovdense.backbone.dense import METHODS
    from ovdense.backbone.prompts import Vocabulary
    from ovdense.io import (
        list_images,
        overlay,
        write_image,
        write_json,
        write_label_png,
    )

    sam_clip = args.method == SAM_CLIP
    if not sam_clip and args.method not in METHODS:
        raise OvdenseError(f"unknown method {args.method!r}; choose from: {', '.join(METHODS)}, "
                           f"{SAM_CLIP}")
    _check_method_options(args)
    if args.classes is not None:
        vocabulary = Vocabulary.parse(_parse_cli_classes(args.classes))
    else:
        vocabulary = Vocabulary.from_file(args.classes_file)
    templates = _read_templates(args.templates)
    images = list_images(args.inputs)
    if not images:
        raise OvdenseError(f"no images found in {' '.join(map(str, args.inputs))}")
    stems = [p.stem for p in images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise OvdenseError(f"several inputs share the name {clashes[0]!r}; their outputs would clash")
    inputs = {p.resolve() for p in images}
    for stem in stems:
        for suffix in ("_labels.png", "_overlay.jpg", "_instances.json" if sam_clip else ".json"):
            if (args.out / f"{stem}{suffix}").resolve() in inputs:
                raise OvdenseError(f"output {args.out / (stem + suffix)} would overwrite an input")

    if sam_clip:
        from ovdense.heads.sam_clip import load_sam

        sam = load_sam(args.sam_checkpoint, args.sam_model, device=args.device)  # fails fast
    pretrained = _pretrained(args.model, args.pretrained)
    backbone = create_backbone(args.model, pretrained=pretrained, device=args.device)
    if sam_clip:
        return _run_sam_clip(args, backbone, sam, vocabulary, templates, images)
    segmenter = Segmenter(
        backbone, args.method, vocabulary, templates=templates,
        short_side=args.short_side, window=tuple(args.window) if args.window else None,
        logit_scale=args.logit_scale, bg_threshold=args.bg_threshold,
        area_threshold=args.area_threshold, pamr=args.pamr, kernel=args.kernel,
    )
    failed: list[Path] = []
    for path, rgb in _readable_images(images, "segment", failed):
        start = time.perf_counter()
        result = segmenter.predict(rgb)
        seconds = time.perf_counter() - start
        shares = result.class_shares()
        write_label_png(args.out / f"{path.stem}_labels.png", result.labels)
        write_image(args.out / f"{path.stem}_overlay.jpg", overlay(rgb, result.labels, result.classes))
        write_json(args.out / f"{path.stem}.json", {
            "image": str(path),
            "size": list(result.labels.shape),
            "method": args.method,
            "model": args.model,
            "pretrained": pretrained,
            "settings": segmenter.settings(),
            "classes": [
                {"index": i, "name": name, "synonyms": list(syn), "pixel_share": shares[i]}
                for i, (name, syn) in enumerate(zip(result.classes, vocabulary.synonyms()))
            ],
            "seconds": round(seconds, 4),
        })
    return _report(args.out, len(images), failed, "result",
                   " (<name>_labels.png, <name>_overlay.jpg, <name>.json)")


def _run_sam_clip(args: argparse.Namespace, backbone, sam, vocabulary, templates, images) -> int:

    from ovdense.heads.sam_clip import SamClipSegmenter, draw_instances
    from ovdense.io import write_image, write_json, write_label_png

    options = {name: getattr(args, name) for name in SAM_SEGMENTER_OPTIONS if getattr(args, name) is not None}
    segmenter = SamClipSegmenter(
        backbone, sam, vocabulary, templates=templates, method=args.clip_method or "clearclip",
        short_side=args.short_side, logit_scale=args.logit_scale, **options,
    )
    failed: list[Path] = []
    for path, rgb in _readable_images(images, "sam-clip", failed):
        result = segmenter.segment(rgb)
        write_label_png(args.out / f"{path.stem}_labels.png", result.labels)
        write_image(args.out / f"{path.stem}_overlay.jpg", draw_instances(rgb, result))
        write_json(args.out / f"{path.stem}_instances.json", result.to_coco(path.stem))
    return _report(args.out, len(images), failed, "result",
                   " (<name>_labels.png, <name>_overlay.jpg, <name>_instances.json)")


def _readable_images(images: Sequence[Path], desc: str, failed: list[Path]):
    """Yield ``(path, rgb)`` for each image that loads, with a progress bar; an unreadable one
    is reported by name, appended to ``failed`` and skipped, so the others still run."""
    from tqdm import tqdm

    from ovdense.io import load_image

    for path in tqdm(images, desc=desc, unit="image", file=sys.stderr):
        try:
            rgb = load_image(path)
        except OvdenseError as e:
            tqdm.write(f"ovdense: skipped: {e}", file=sys.stderr)
            failed.append(path)
            continue
        yield path, rgb


def _report(out: Path, total: int, failed: list[Path], what: str, files: str) -> int:
    """Print where results went and how many images failed; the exit code (1 if any failed)."""
    done = total - len(failed)
    print(f"ovdense: wrote {done} {what}{'s' if done != 1 else ''} to {out}/{files}")
    if failed:
        print(f"ovdense: {len(failed)} of {total} images failed", file=sys.stderr)
    return 1 if failed else 0


def _pretrained(model: str, value: str | None) -> str | None:
    """The CLI's weights rule: 'none' is random; no value means the model's usual weights."""
    if value is not None:
        return None if value.lower() == "none" else value
    if model == "toy" or model.endswith(".json"):
        return None
    return "laion400m_e31" if model == "ViT-B-16-plus-240" else "openai"


def _command_anomaly(args: argparse.Namespace) -> int:
    import numpy as np

    from ovdense import create_backbone
    from ovdense.anomaly.winclip import WinClip
    from ovdense.io import heatmap_overlay, list_images, write_bytes, write_image, write_json

    images = list_images(args.inputs)
    if not images:
        raise OvdenseError(f"no images found in {' '.join(map(str, args.inputs))}")
    references = []
    if args.reference is not None:
        if not args.reference.is_dir():
            raise OvdenseError(f"reference folder not found: {args.reference}")
        references = list_images([args.reference])
        if args.shots < 1 or args.shots > len(references):
            raise OvdenseError(f"--shots {args.shots} asked, the reference folder has "
                               f"{len(references)} images")
        references = references[: args.shots]
    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    winclip = WinClip(backbone, args.object, prompt_set=args.prompt_set)
    if references:
        winclip.set_references(references)
    failed: list[Path] = []
    for path, rgb in _readable_images(images, "anomaly", failed):
        (result,) = winclip.predict([rgb])
        import io as _io

        buffer = _io.BytesIO()
        np.save(buffer, result.map, allow_pickle=False)
        write_bytes(args.out / f"{path.stem}_anomaly.npy", buffer.getvalue())
        write_image(args.out / f"{path.stem}_heatmap.png", heatmap_overlay(rgb, result.map))
        write_json(args.out / f"{path.stem}_anomaly.json", {
            "image": str(path), "size": list(result.map.shape), "object": args.object,
            "score": result.score, "map_max": float(result.map.max()),
            "mode": f"WinCLIP+ ({len(references)}-shot)" if references else "WinCLIP (zero-shot)",
            "references": [str(r) for r in references], "model": args.model,
            "prompt_set": args.prompt_set,
        })
    return _report(args.out, len(images), failed, "anomaly map", "")


def _command_anomaly_eval(args: argparse.Namespace) -> int:
    import csv
    import io as _io

    from ovdense import create_backbone
    from ovdense.anomaly.evaluate import evaluate
    from ovdense.io import write_bytes, write_image

    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    results = evaluate(backbone, args.dataset, args.root, args.categories, args.shots, args.prompt_set)
    columns = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "pixel_ap"]
    rows = [[name] + [100 * getattr(r, c) for c in columns] for name, r in results.items()]
    rows.append(["mean"] + [sum(row[i] for row in rows) / len(rows) for i in range(1, len(columns) + 1)])
    lines = [f"{'category':<14}" + "".join(f"{c:>13}" for c in columns)]
    lines += [f"{row[0]:<14}" + "".join(f"{v:>13.1f}" for v in row[1:]) for row in rows]
    print("\n".join(lines))
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category"] + columns)
    writer.writerows([[row[0]] + [f"{v:.2f}" for v in row[1:]] for row in rows])
    stem = f"anomaly_{args.dataset}_{args.shots}shot"
    write_bytes(args.out / f"{stem}.csv", buffer.getvalue().encode())
    write_image(args.out / f"{stem}.png", _table_picture(lines))
    print(f"ovdense: wrote {args.out / (stem + '.csv')} and {args.out / (stem + '.png')}")
    return 0


def _table_picture(lines: list[str]):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = 8 + 7 * max(len(line) for line in lines)
    canvas = Image.new("RGB", (width, 8 + 16 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 16 * i), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return _command_methods()
        if args.command == "anomaly":
            return _command_anomaly(args)
        if args.command == "anomaly-eval":
            return _command_anomaly_eval(args)
        return _command_segment(args)
    except OvdenseError as e:
        print(f"ovdense: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovdense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
