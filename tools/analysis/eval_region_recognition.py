"""Region recognition of a backbone on a panoptic dataset (CLIPSelf's Table 1 benchmark):

    python tools/analysis/eval_region_recognition.py --model ViT-B-16 --pretrained openai --data data/coco
    python tools/analysis/eval_region_recognition.py --model ViT-B-16-quickgelu \\
        --pretrained clipself_openai_vitb16.pt --data data/coco --out region_recognition.json

``--data`` holds COCO's panoptic layout: ``val2017/*.jpg``, ``annotations/panoptic_val2017.json`` and
``annotations/panoptic_val2017/*.png`` (133 classes: 80 things, 53 stuff). Every segment is named
from the dense features of the whole image (**boxes**: 1×1 RoIAlign at its box; **masks**: mean over
its mask) and from its crop's class token (**crops**, the ceiling), against the class names in ViLD's
63 templates (``--templates``; a backbone with templates of its own, as the toy, uses those).
Printed: the mean per-class top-1 / top-5 accuracy of things and of stuff (``ovdense/eval/regions.py``
says how each follows the official ``zero_shot.py``).

The toy world's held-out scenes in the same layout (the 30 colour–shape pairs as things, the five
backgrounds as stuff), and the toy before and after CLIPSelf:

    python tools/data/make_synthetic_dataset.py --layout coco-panoptic --out synthetic/panoptic \\
        --num 100 --seed 7
    python tools/analysis/eval_region_recognition.py --model toy --data synthetic/panoptic/coco \\
        --image-size 128
    python tools/analysis/eval_region_recognition.py --model toy --data synthetic/panoptic/coco \\
        --image-size 128 --pretrained work_dirs/clipself_toy_synthetic/clipself_backbone.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="create_backbone name (ViT-B-16, toy, a JSON config)")
    parser.add_argument("--pretrained", help="open_clip tag or weights file (a CLIPSelf backbone file too)")
    parser.add_argument("--data", required=True, type=Path, help="folder with val2017/ and annotations/")
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--image-size", type=int, default=1024,
                        help="long side of the whole image (1024 for B/16, 896 for L/14, as CLIPSelf)")
    parser.add_argument("--crop-size", type=int, help="crop input (default: the backbone's native size)")
    parser.add_argument("--templates", help="template set for the class names (default: the backbone's own, "
                        "as the toy's; else ViLD's 63, 'vild')")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    return parser.parse_args(argv)


def class_name(name: str) -> str:
    """ViLD's ``processed_name``: ``_`` → space, ``/`` → " or ", lower case, no trailing dot."""
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


def run(args: argparse.Namespace) -> dict:
    import itertools

    from ovdense import create_backbone
    from ovdense.errors import OvdenseError
    from ovdense.eval import regions as rr

    if args.image_size <= 0 or (args.limit is not None and args.limit <= 0):
        raise OvdenseError("--image-size and --limit must be positive")
    backbone = create_backbone(args.model, pretrained=args.pretrained, device=args.device)
    visual = backbone.model.visual
    patch = int(visual.patch_size[0])
    if args.image_size % patch:
        raise OvdenseError(f"--image-size {args.image_size} is not a multiple of the patch size {patch}")
    crop = args.crop_size or backbone.native_size[0]
    annotations = args.data / "annotations"
    categories, samples = rr.read_panoptic(annotations / f"panoptic_{args.split}.json",
                                           args.data / args.split, annotations / f"panoptic_{args.split}")
    templates = args.templates or backbone.defaults.get("templates", "vild")
    text = backbone.encode_text([class_name(c["name"]) for c in categories], templates)
    if args.limit is not None:
        samples = itertools.islice(samples, args.limit)
    prepared = (rr.prepare(s, categories, backbone.mean, backbone.std, patch, args.image_size, crop)
                for s in samples)
    result = rr.evaluate(visual.eval(), text, prepared)
    result.update(model=args.model, pretrained=args.pretrained, image_size=args.image_size, crop_size=crop,
                  templates=templates if isinstance(templates, str) else list(templates))
    return result


def table(result: dict) -> str:
    def cell(value):
        return "—" if value is None else f"{100 * value:.1f}"

    lines = ["| region | thing top-1 | thing top-5 | stuff top-1 | stuff top-5 |", "|---|---|---|---|---|"]
    for kind in ("boxes", "masks", "crops"):
        r = result[kind]
        lines.append(f"| {kind} | {cell(r['thing']['top1'])} | {cell(r['thing']['top5'])} | "
                     f"{cell(r['stuff']['top1'])} | {cell(r['stuff']['top5'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ovdense.errors import OvdenseError
    from ovdense.io import write_json

    args = parse_args(argv)
    try:
        result = run(args)
    except OvdenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} ({args.pretrained or 'default weights'}), {result['regions']} regions")
    print(table(result))
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
