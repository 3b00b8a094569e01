"""``ovdense anomaly`` (WinCLIP, WinCLIP+ with references, or AdaptCLIP, through the registry) and
``ovdense anomaly-eval`` (the metrics on MVTec AD or VisA)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ovdense.cli.common import (
    _check_device,
    _check_out,
    _check_range,
    _list_inputs,
    _pending,
    _pretrained,
    _readable_images,
    _report,
)
from ovdense.errors import OvdenseError
from ovdense.registry import default_head, get_head

ANOMALY_OUTPUTS = default_head("anomaly").outputs  # the JSON last: the completion marker


def _command_anomaly(args: argparse.Namespace) -> int:
    entry = get_head(args.method, "anomaly") if args.method is not None else None
    if args.object is None:
        if entry is None or "head_checkpoint" not in entry.options:  # WinCLIP's prompts name the object
            raise OvdenseError("--object NAME is needed: say what the images show, e.g. --object bottle")
        args.object = "object"  # AdaptCLIP's prompts say "object" for every category
    if not args.object.strip():
        raise OvdenseError("the object name is empty: say what the images show, e.g. --object bottle")
    _check_range(args, "max_pixels", 1)
    images = _list_inputs(args.inputs)
    _check_out(args.out)
    references = _reference_images(args)
    if entry is not None:  # a head named: its need of references must match --reference
        if "references" in entry.required and not references:
            raise OvdenseError(f"--method {entry.name} needs --reference FOLDER (its normal images)")
        if references and "references" not in entry.required + entry.accepts:
            raise OvdenseError(f"--method {entry.name} takes no --reference; leave it out, or choose a "
                               f"head that reads normal images ({', '.join(_with_references())})")
    if args.head_checkpoint is not None and (entry is None or "head_checkpoint" not in entry.options):
        named = f"--method {entry.name}" if entry else "WinCLIP"
        raise OvdenseError(f"--head-checkpoint: not an option of {named}; it is AdaptCLIP's "
                           "(--method adaptclip)")
    todo, skipped = _pending(args, images, ANOMALY_OUTPUTS)
    if not todo:
        return _report(args.out, len(images), [], "anomaly map", "", skipped)
    _check_device(args.device)

    from ovdense import create_backbone, create_head
    from ovdense.io import load_image

    arrays = [load_image(p, max_pixels=args.max_pixels) for p in references]  # before the model
    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    given = {"references": arrays} if references else {}
    if args.method is None:
        entry = default_head("anomaly", set(given))  # WinCLIP+ with references, else WinCLIP
    options = {name: getattr(args, name) for name in entry.options}  # its own flags (--prompt-set)
    head = create_head(entry.name, backbone, args.object, **options, **given)
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "anomaly", failed, args.max_pixels):
        (result,) = head.predict([rgb])
        result.save(args.out, path.stem, rgb, image=str(path), object=args.object,
                    references=[str(r) for r in references], model=args.model)
    return _report(args.out, len(images), failed, "anomaly map", "", skipped)


def _with_references() -> list[str]:
    """The anomaly heads that take normal reference images."""
    from ovdense.registry import HEADS, list_heads

    return [name for name in list_heads("anomaly")
            if "references" in HEADS[name].required + HEADS[name].accepts]


def _reference_images(args: argparse.Namespace) -> list[Path]:
    """The first ``--shots`` images of ``--reference`` (none without it)."""
    from ovdense.io import list_images

    if args.reference is None:
        if args.shots is not None:
            raise OvdenseError("--shots needs --reference FOLDER (the normal images of WinCLIP+ or "
                               "AdaptCLIP)")
        return []
    if args.reference.is_file():
        raise OvdenseError(f"--reference {args.reference} is a file; give the folder of normal images")
    if not args.reference.is_dir():
        raise OvdenseError(f"reference folder not found: {args.reference}")
    references = list_images([args.reference])
    if not references:
        raise OvdenseError(f"the reference folder {args.reference} holds no images: give normal images of "
                           "the object")
    shots = 1 if args.shots is None else args.shots
    if shots < 1 or shots > len(references):
        raise OvdenseError(f"--shots {shots} asked, the reference folder has {len(references)} images")
    return references[:shots]


def _command_anomaly_eval(args: argparse.Namespace) -> int:
    import csv
    import io as _io

    from ovdense.anomaly.evaluate import check_dataset

    if args.shots < 0:
        raise OvdenseError(f"--shots must be ≥ 0 (0 = zero-shot), got {args.shots}")
    if args.head_checkpoint is not None and args.method != "adaptclip":
        raise OvdenseError("--head-checkpoint is AdaptCLIP's: add --method adaptclip")
    if args.head_checkpoint is not None and not args.head_checkpoint.is_file():
        raise OvdenseError(f"AdaptCLIP head checkpoint not found: {args.head_checkpoint}")
    _check_range(args, "max_pixels", 1)
    categories = check_dataset(args.dataset, args.root, args.categories, args.shots)
    _check_out(args.out)
    _check_device(args.device)

    from ovdense import create_backbone
    from ovdense.anomaly.evaluate import evaluate
    from ovdense.io import write_bytes, write_image

    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    results = evaluate(backbone, args.dataset, args.root, categories, args.shots, args.prompt_set,
                       max_pixels=args.max_pixels, method=args.method, head_checkpoint=args.head_checkpoint,
                       reference_seed=args.reference_seed)
    columns = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "pixel_ap", "image_ap"]
    rows = [[name] + [100 * getattr(r, c) for c in columns] for name, r in results.items()]
    rows.append(["mean"] + [sum(row[i] for row in rows) / len(rows) for i in range(1, len(columns) + 1)])
    lines = [f"{'category':<14}" + "".join(f"{c:>13}" for c in columns)]
    lines += [f"{row[0]:<14}" + "".join(f"{v:>13.1f}" for v in row[1:]) for row in rows]
    print("\n".join(lines))
    buffer = _io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category"] + columns)
    writer.writerows([[row[0]] + [f"{v:.2f}" for v in row[1:]] for row in rows])
    stem = f"anomaly_{args.dataset}_{args.shots}shot" + ("_adaptclip" if args.method == "adaptclip" else "")
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


