"""``ovdense detect``: the detection head (``ovdense.registry``) over images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ovdense.backbone.model_config import TOY_NAMES
from ovdense.cli.common import (
    _check_device,
    _check_no_overwrite,
    _check_out,
    _check_range,
    _list_inputs,
    _pending,
    _pretrained,
    _read_classes,
    _readable_images,
    _report,
)
from ovdense.errors import OvdenseError
from ovdense.registry import default_head, get_head

DETECT_OUTPUTS = default_head("detection").outputs  # the JSON last: the completion marker


def _read_detect_classes(args: argparse.Namespace) -> list[str]:
    """``--classes`` / ``--classes-file`` as plain names: one word (or phrase) per class, each once."""
    from ovdense.backbone.prompts import single_names

    vocabulary = _read_classes(args)
    how = " ('|')" if args.classes is not None else " (commas)"
    return single_names(vocabulary.synonyms(), "detect", how)


def _command_detect(args: argparse.Namespace) -> int:
    _check_range(args, "score_threshold", 0, 1)
    _check_range(args, "image_size", 1)
    _check_range(args, "max_pixels", 1)
    if args.head_checkpoint is not None and not args.head_checkpoint.is_file():
        raise OvdenseError(f"--head-checkpoint {args.head_checkpoint}: no such file (an F-ViT head written "
                           "by tools/train.py configs/ovdet/...: work_dirs/<config>/fvit_head.safetensors)")
    if args.head_checkpoint is None and args.model not in TOY_NAMES:
        # only the toy models ship a head (ovdense.heads.fvit.default_head_checkpoint): say so
        # before a backbone is downloaded and built
        raise OvdenseError(f"no F-ViT head ships for --model {args.model}: pass --head-checkpoint PATH, a "
                           "head trained with python tools/train.py configs/ovdet/<config>.py "
                           "(work_dirs/<config>/fvit_head.safetensors); only --model toy and toy-clipself "
                           "ship one")
    classes = _read_detect_classes(args)
    images = _list_inputs(args.inputs)
    _check_out(args.out)
    _check_no_overwrite(args.out, images, DETECT_OUTPUTS)
    todo, skipped = _pending(args, images, DETECT_OUTPUTS, key="detections")
    if not todo:
        return _report(args.out, len(images), [], "result", "", skipped)
    _check_device(args.device)

    from ovdense import create_backbone, create_head

    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    entry = get_head(args.method, "detection")
    options = {name: getattr(args, name) for name in entry.options}
    detector = create_head(entry.name, backbone, classes, **options)
    stored = list(getattr(detector, "text_sources", ())).count("stored")
    if stored:  # a converted published head (tools/model_converters/fvit2ovdense.py) brings its own text
        print(f"ovdense: {stored} of {len(classes)} classes take the text embeddings stored in the head file "
              "(the ones it was trained with); the backbone encodes the others")
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "detect", failed, args.max_pixels):
        result = detector.predict(rgb)
        result.save(args.out, path.stem, rgb)
    return _report(args.out, len(images), failed, "result", " (<name>.json, <name>_overlay.jpg)", skipped)


