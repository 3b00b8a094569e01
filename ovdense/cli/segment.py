"""``ovdense segment`` and ``ovdense methods``: every segmentation head through the registry."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ovdense.backbone.model_config import model_defaults
from ovdense.cli.common import (
    _check_device,
    _check_no_overwrite,
    _check_out,
    _check_range,
    _list_inputs,
    _pending,
    _pretrained,
    _read_classes,
    _read_templates,
    _readable_images,
    _report,
)
from ovdense.errors import OvdenseError
from ovdense.registry import DEFAULT_HEADS, HEADS, get_head, list_heads

#: the segment flags that belong to some heads only (``HeadEntry.options``), in the registry's order
HEAD_OPTIONS = tuple(dict.fromkeys(option for name in list_heads("segmentation")
                                   for option in HEADS[name].options))
#: flags whose default is a value rather than ``None``: given when they differ from it
FLAG_DEFAULTS = {"kernel": "auto"}
#: flags that reach the head under another keyword
KEYWORDS = {"clip_method": "method", "image_prompt": "image_prompts"}
#: flags read here, not passed on: SAM's checkpoint and type become the ``sam`` model, the VFM's name
#: and weights the ``vfm`` model
SAM_FLAGS = ("sam_checkpoint", "sam_model")
VFM_FLAGS = ("vfm", "vfm_weights")
#: the VFM a method that needs one gets when ``--vfm`` is not given (ProxyCLIP's tables use DINO B/8)
DEFAULT_VFM = "dino_vitb8"


def _given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name) != FLAG_DEFAULTS.get(name)


def _check_method_options(args: argparse.Namespace) -> None:
    """Options of one head given to another are a usage error, not silently ignored."""
    entry = HEADS[args.method]
    given = [name for name in HEAD_OPTIONS if _given(args, name) and name not in entry.options]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise OvdenseError(f"{flags}: not an option of --method {args.method}{entry.option_hint}")


def _check_segment_arguments(args: argparse.Namespace) -> None:
    """Every number of ``segment`` in range and the window consistent, before any model."""
    if args.window is not None:
        crop, stride = args.window
        if (crop, stride) != (0, 0):
            if crop <= 0 or stride <= 0:
                raise OvdenseError(f"--window {crop} {stride}: crop and stride must be positive (or 0 0 "
                                   "for one pass over the whole image)")
            if stride > crop:
                raise OvdenseError(f"--window {crop} {stride}: the stride is larger than the crop, so the "
                                   "windows would leave gaps; use a stride ≤ the crop")
    _check_range(args, "short_side", 0)
    _check_range(args, "logit_scale", 0, low_open=True)
    for name in ("bg_threshold", "area_threshold", "pred_iou_thresh", "stability_score_thresh",
                 "box_nms_thresh", "unknown_threshold", "crop_area", "crop_weight", "attention_threshold",
                 "score_threshold"):
        _check_range(args, name, 0, 1)
    _check_range(args, "points_per_side", 1, 1024)
    _check_range(args, "min_mask_region_area", 0)
    _check_range(args, "max_pixels", 1)


KIND_HEADINGS = {"detection": "detection (ovdense detect): boxes and instance masks for any words",
                 "anomaly": "anomaly (ovdense anomaly): defect heat maps of images of one object"}


def _command_methods() -> int:
    """Every registered head (``ovdense.registry``): the segmentation heads with their defaults,
    then the detection and the anomaly heads."""
    print(f"{'method':<10} {'short side':>10} {'window':>9} {'logit scale':>11} {'pamr':>5}  paper")
    segmentation = [HEADS[name] for name in list_heads("segmentation")]
    for entry in [e for e in segmentation if e.training_free]:
        print(_table_row(entry, entry.paper + (f"; needs {entry.hint}" if entry.hint else "")))
    print("\nheads beyond the training-free ones:")
    for entry in [e for e in segmentation if not e.training_free]:
        print(_table_row(entry, f"{entry.paper}: {entry.summary}; {entry.hint}"))
    for kind, heading in KIND_HEADINGS.items():
        print(f"\n{heading}")
        for name in list_heads(kind):
            entry = HEADS[name]
            print(f"{name:<10} {entry.paper}: {entry.summary}; {entry.hint}")
    return 0


def _table_row(entry, text: str) -> str:
    short_side, window, logit_scale, pamr = entry.table if entry.table is not None else ("-",) * 4
    return f"{entry.name:<10} {short_side:>10} {window:>9} {logit_scale:>11} {pamr:>5}  {text}"


def _command_segment(args: argparse.Namespace) -> int:
    from ovdense.backbone.protocols import METHOD_INFO as METHODS  # torch-free

    if args.method is None:  # the model's own default (before it loads), else the kind's
        args.method = model_defaults(args.model).get("method", DEFAULT_HEADS["segmentation"])
    entry = get_head(args.method, "segmentation")  # the error lists the segmentation heads
    _check_method_options(args)
    _check_segment_arguments(args)
    if args.clip_method is not None and args.clip_method not in METHODS:
        raise OvdenseError(f"unknown --clip-method {args.clip_method!r}; choose from: {', '.join(METHODS)}")
    vfm_weights = _vfm_weights(args) if "vfm" in entry.needs else None
    if args.head_checkpoint is not None and not args.head_checkpoint.is_file():
        raise OvdenseError(f"--head-checkpoint {args.head_checkpoint}: no such file (a trained head: "
                           "tools/train.py writes one, tools/model_converters/ convert published ones)")
    vocabulary = _read_classes(args)
    templates = _read_templates(args.templates)
    images = _list_inputs(args.inputs)
    _check_out(args.out)
    _check_no_overwrite(args.out, images, entry.outputs)
    todo, skipped = _pending(args, images, entry.outputs)
    if not todo:
        return _report(args.out, len(images), [], "result", "", skipped)
    _check_device(args.device)

    from ovdense import create_backbone, create_head

    options = {KEYWORDS.get(name, name): getattr(args, name) for name in entry.options
               if name not in SAM_FLAGS + VFM_FLAGS and getattr(args, name) is not None}
    if "image_prompts" in options:
        options["image_prompts"] = _read_image_prompts(options["image_prompts"], args.max_pixels)
    if "window" in options:
        options["window"] = tuple(options["window"])
    if "sam" in entry.needs:
        from ovdense.heads.sam_clip import load_sam

        options["sam"] = load_sam(args.sam_checkpoint, args.sam_model, device=args.device)  # fails fast
    if "vfm" in entry.needs:
        from ovdense.backbone.vfm import create_vfm

        options["vfm"] = create_vfm(args.vfm or DEFAULT_VFM, vfm_weights, device=args.device)  # fails fast
    pretrained = _pretrained(args.model, args.pretrained)
    backbone = create_backbone(args.model, pretrained=pretrained, device=args.device)
    segmenter = create_head(args.method, backbone, vocabulary, templates=templates,
                            short_side=args.short_side, **options)
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "segment", failed, args.max_pixels):
        start = time.perf_counter()
        result = segmenter.predict(rgb)
        seconds = time.perf_counter() - start
        result.save(args.out, path.stem, rgb, image=str(path), method=args.method, model=args.model,
                    pretrained=pretrained, seconds=round(seconds, 4))
    files = ", ".join(f"<name>{suffix}" for suffix in entry.outputs)
    return _report(args.out, len(images), failed, "result", f" ({files})", skipped)


def _vfm_weights(args: argparse.Namespace) -> str | None:
    """``--vfm-weights``: a file that exists, ``none`` (random weights, ``"random"``), or not given
    (``None``: ``create_vfm`` names the file the VFM needs and where to get it)."""
    path = args.vfm_weights
    if path is None:
        return None
    if str(path).lower() == "none":
        return "random"
    if not path.is_file():
        raise OvdenseError(f"--vfm-weights {path}: no such file (the official weights of --vfm "
                           f"{args.vfm or DEFAULT_VFM}; nothing is downloaded)")
    return str(path)


def _read_image_prompts(values: list[str], max_pixels: int | None) -> dict:
    """``--image-prompt NAME=IMAGE[:MASK]`` → ``{name: (rgb, mask)}``, every file read and checked
    before any model is built (the mask: non-zero on the object, the image's size)."""
    import numpy as np

    prompts: dict = {}
    for value in values:
        name, sep, files = value.partition("=")
        name = name.strip()
        if not sep or not name or not files:
            raise OvdenseError(f"--image-prompt {value!r}: write NAME=IMAGE or NAME=IMAGE:MASK")
        if name in prompts:
            raise OvdenseError(f"--image-prompt {value!r}: {name!r} is named twice")
        image, mask = files, None
        if ":" in files and not Path(files).exists():
            image, _, mask = files.rpartition(":")
        rgb = _load_prompt_file(image, value, max_pixels)
        if mask is None:
            region = np.ones(rgb.shape[:2], bool)
        else:
            region = _load_prompt_file(mask, value, max_pixels).max(axis=2) > 0
            if region.shape != rgb.shape[:2]:
                raise OvdenseError(f"--image-prompt {value!r}: the mask is {region.shape[1]}x"
                                   f"{region.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
            if not region.any():
                raise OvdenseError(f"--image-prompt {value!r}: the mask is empty (all zero)")
        prompts[name] = (rgb, region)
    return prompts


def _load_prompt_file(path: str, value: str, max_pixels: int | None):
    from ovdense.io import load_image

    if not Path(path).is_file():
        raise OvdenseError(f"--image-prompt {value!r}: no such file: {path}")
    try:
        return load_image(path, max_pixels=max_pixels)
    except OvdenseError as e:
        raise OvdenseError(f"--image-prompt {value!r}: {e}") from None
