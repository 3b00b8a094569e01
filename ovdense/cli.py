"""The ``ovdense`` command line: argument parsing and printing only; the work is the API's.

    ovdense segment IMAGE... | DIR --classes "cat,dog,grass" [--method clearclip] ...
    ovdense methods
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
    seg.add_argument("--method", default="clearclip", help="see `ovdense methods`")
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

    sub.add_parser("methods", help="list the training-free methods and their defaults")
    return parser


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
    from tqdm import tqdm

    from ovdense import Segmenter, create_backbone
    from ovdense.backbone.dense import METHODS
    from ovdense.backbone.prompts import Vocabulary
    from ovdense.io import (
        list_images,
        load_image,
        overlay,
        write_image,
        write_json,
        write_label_png,
    )

    if args.method not in METHODS:
        raise OvdenseError(f"unknown method {args.method!r}; choose from: {', '.join(METHODS)}")
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
        for suffix in ("_labels.png", "_overlay.jpg", ".json"):
            if (args.out / f"{stem}{suffix}").resolve() in inputs:
                raise OvdenseError(f"output {args.out / (stem + suffix)} would overwrite an input")

    pretrained = _pretrained(args.model, args.pretrained)
    backbone = create_backbone(args.model, pretrained=pretrained, device=args.device)
    segmenter = Segmenter(
        backbone, args.method, vocabulary, templates=templates,
        short_side=args.short_side, window=tuple(args.window) if args.window else None,
        logit_scale=args.logit_scale, bg_threshold=args.bg_threshold,
        area_threshold=args.area_threshold, pamr=args.pamr, kernel=args.kernel,
    )
    failed = 0
    for path in tqdm(images, desc="segment", unit="image", file=sys.stderr):
        try:
            rgb = load_image(path)
        except OvdenseError as e:
            tqdm.write(f"ovdense: skipped: {e}", file=sys.stderr)
            failed += 1
            continue
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
    done = len(images) - failed
    print(f"ovdense: wrote {done} result{'s' if done != 1 else ''} to {args.out}/ "
          "(<name>_labels.png, <name>_overlay.jpg, <name>.json)")
    if failed:
        print(f"ovdense: {failed} of {len(images)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _pretrained(model: str, value: str | None) -> str | None:
    """The CLI's weights rule: 'none' is random; no value means the model's usual weights."""
    if value is not None:
        return None if value.lower() == "none" else value
    if model == "toy" or model.endswith(".json"):
        return None
    return "openai"


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            return _command_methods()
        return _command_segment(args)
    except OvdenseError as e:
        print(f"ovdense: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovdense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
