"""The ``ovdense`` command line: argument parsing and printing only; the work is the API's.

    ovdense segment IMAGE... | DIR --classes "cat,dog,grass" [--method clearclip] ...
    ovdense segment IMAGE... | DIR --classes ... --method sam-clip --sam-checkpoint sam_vit_b_01ec64.pth
    ovdense segment IMAGE... | DIR --classes ... --method san [--head-checkpoint san_head.safetensors]
    ovdense detect IMAGE... | DIR --classes "cat,dog" [--model toy] [--head-checkpoint fvit_head.safetensors]
    ovdense methods
    ovdense anomaly IMAGE... | DIR --object bottle [--reference DIR --shots K]
    ovdense anomaly-eval --dataset mvtec|visa --root DIR [--shots K]

Every argument is checked before any model is built; a bad one is one ``ovdense: error:`` line
and exit code 2. Over a folder, an image that cannot be read (missing, corrupt, over
``--max-pixels``) costs one ``ovdense: skipped:`` line and the rest run (exit code 1).
``--skip-existing`` resumes an interrupted run: an image whose outputs are all there is not
computed again (its JSON, written last and atomically, marks it complete).

This module imports no torch, numpy or open_clip at module level (``ovdense --help`` stays
fast): each command imports what it uses.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ovdense.errors import OvdenseError, strip_unpickling_advice

MAX_PIXELS = 100_000_000  # = ovdense.io.MAX_PIXELS (not imported: io imports numpy and PIL)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``ovdense: error: ...`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"ovdense: error: {message} (see `{self.prog} --help`)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ovdense", description="Open-vocabulary dense prediction on a CLIP backbone."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seg = sub.add_parser(
        "segment",
        help="segment images with any list of words",
        description="Segment images with a training-free method, a trained SAN head or SAM + CLIP. "
        "For each image writes "
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
                     help="see `ovdense methods`; 'san' (a trained SAN head) or 'sam-clip' (SAM masks "
                     "classified by CLIP)")
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
    _add_batch_arguments(seg)
    san = seg.add_argument_group("SAN (--method san)", "a trained side adapter on the backbone")
    san.add_argument("--head-checkpoint", type=Path,
                     help="a SAN head (san_head.safetensors from tools/train.py or "
                     "tools/model_converters/san2ovdense.py; default for --model toy: the shipped one)")
    _add_sam_clip_arguments(seg)
    _add_detect_parser(sub)

    sub.add_parser("methods", help="list the segmentation methods and their defaults, and the detector")

    anomaly = sub.add_parser(
        "anomaly", help="defect heat maps with WinCLIP (zero-shot) or WinCLIP+ (few-shot)",
        description="For each image writes <stem>_anomaly.npy (float32 map), "
        "<stem>_heatmap.png (overlay) and <stem>_anomaly.json (image score).",
    )
    anomaly.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    anomaly.add_argument("--object", required=True, help="what the images show, e.g. bottle")
    anomaly.add_argument("--reference", type=Path, help="folder of normal images (WinCLIP+)")
    anomaly.add_argument("--shots", type=int, help="reference images to use (default 1; needs --reference)")
    _add_anomaly_model_arguments(anomaly)
    anomaly.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    _add_batch_arguments(anomaly)

    evaluation = sub.add_parser("anomaly-eval", help="WinCLIP metrics on MVTec AD or VisA")
    evaluation.add_argument("--dataset", required=True, choices=("mvtec", "visa"))
    evaluation.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    evaluation.add_argument("--shots", type=int, default=0, help="0 = zero-shot WinCLIP")
    evaluation.add_argument("--categories", nargs="+", help="default: all")
    _add_anomaly_model_arguments(evaluation)
    evaluation.add_argument("--out", type=Path, default=Path("outputs"), help="where the CSV and picture go")
    _add_max_pixels_argument(evaluation)
    return parser


def _add_detect_parser(sub) -> None:
    det = sub.add_parser(
        "detect", help="detect and segment objects named by any words (F-ViT head)",
        description="Detect objects of any classes with a trained F-ViT head on the frozen backbone "
        "(F-VLM / F-ViT: the head's scores ensembled with CLIP's region scores). For each image writes "
        "<stem>.json ({\"classes\": [...], \"detections\": [{\"bbox\": [x, y, w, h], \"category_id\", "
        "\"class\", \"score\", \"segmentation\": COCO RLE}]}, input-image pixels) and <stem>_overlay.jpg.",
    )
    det.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    vocab = det.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--classes", help="comma-separated class names, e.g. 'red circle,blue star'")
    vocab.add_argument("--classes-file", type=Path, help="one class name per line")
    det.add_argument("--model", default="ViT-B-16",
                     help="open_clip model name, 'toy', or a JSON model config (the head's backbone)")
    det.add_argument(
        "--pretrained",
        help="open_clip tag or checkpoint file; 'none' = random weights (default: 'openai' for "
        "open_clip models, the embedded weights for 'toy', random for a JSON config)",
    )
    det.add_argument("--head-checkpoint", type=Path,
                     help="an F-ViT head (fvit_head.safetensors from tools/train.py configs/ovdet/...; "
                     "default for --model toy: the shipped one)")
    det.add_argument("--score-threshold", type=float, default=0.3,
                     help="keep detections scoring at least this (default 0.3)")
    det.add_argument("--image-size", type=int,
                     help="long side the image is resized to for the network, in pixels (default: the "
                     "model's, 640 for open_clip models)")
    det.add_argument("--no-ensemble", dest="ensemble", action="store_false",
                     help="the detector head's own scores, without F-ViT's CLIP region-score ensemble")
    det.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    det.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_batch_arguments(det)


def _add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS,
        help=f"refuse (skip) images with more pixels than this, read from the file's header before "
        f"decoding (default {MAX_PIXELS:_})",
    )


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    _add_max_pixels_argument(parser)
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="skip images whose outputs are all in --out already (resume an interrupted run)",
    )


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
SAN = "san"
SAM_SEGMENTER_OPTIONS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                         "min_mask_region_area", "unknown_threshold", "crop_area", "crop_weight")
SAM_OPTIONS = ("sam_checkpoint", "sam_model", "clip_method", *SAM_SEGMENTER_OPTIONS)
DENSE_ONLY_OPTIONS = ("window", "area_threshold", "bg_threshold", "pamr")
SAN_OPTIONS = ("head_checkpoint",)


def _check_method_options(args: argparse.Namespace) -> None:
    """Options of one kind of method given to another are a usage error, not silently ignored."""
    hint = ""
    if args.method in (SAM_CLIP, SAN):
        given = [name for name in DENSE_ONLY_OPTIONS if getattr(args, name) is not None]
        given += ["kernel"] if args.kernel != "auto" else []
        if args.method == SAM_CLIP:
            given += [name for name in SAN_OPTIONS if getattr(args, name) is not None]
            hint = " (SAM + CLIP uses --unknown-threshold)"
        else:
            given += [name for name in SAM_OPTIONS if getattr(args, name) is not None]
            given += ["logit_scale"] if args.logit_scale is not None else []
    else:
        given = [name for name in (*SAM_OPTIONS, *SAN_OPTIONS) if getattr(args, name) is not None]
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


TEMPLATE_SETS = ("imagenet80", "single")


def _read_text_file(path: Path, what: str, option: str) -> str:
    """The UTF-8 text of a file the user named, or one ``OvdenseError`` line that says why not."""
    if path.is_dir():
        raise OvdenseError(f"{option} {path} is a folder; give a text file")
    if not path.is_file():
        raise OvdenseError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OvdenseError(f"{option} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise OvdenseError(f"cannot read {option} {path}: {e.strerror or e}") from e


def _read_templates(value: str | None):
    """``--templates``: a set's name, one template with ``{}``, or a file of them (one a line),
    each checked here (exactly one ``{}``), before any model is built."""
    if value is None:
        return None
    path = Path(value)
    if value in TEMPLATE_SETS:
        return value
    if not path.suffix and not path.exists():
        if value.count("{}") != 1:
            raise OvdenseError(f"--templates {value!r}: use {' or '.join(TEMPLATE_SETS)}, a file of "
                               "templates, or one template with exactly one '{}' for the class name")
        return value
    lines = [line.strip() for line in _read_text_file(path, "template file", "--templates").splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise OvdenseError(f"template file {path} has no templates")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise OvdenseError(f"template file {path}: template {number} {template[:60]!r} has "
                               f"{template.count('{}')} '{{}}'; each needs exactly one, where the class goes")
    return templates


def _read_classes(args: argparse.Namespace):
    from ovdense.backbone.prompts import Vocabulary

    if args.classes is not None:
        return Vocabulary.parse(_parse_cli_classes(args.classes))
    _read_text_file(args.classes_file, "class file", "--classes-file")  # one message for every failure
    return Vocabulary.from_file(args.classes_file)


def _check_out(out: Path) -> None:
    """``--out`` must be (or become) a writable folder: created here, before any model is built."""
    if out.exists() and not out.is_dir():
        raise OvdenseError(f"--out {out} is a file; give a folder for the outputs")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise OvdenseError(f"--out {out}: {parent} is a file, so the folder cannot be made there")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OvdenseError(f"cannot create the output folder {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise OvdenseError(f"the output folder {out} is not writable")


def _check_range(args: argparse.Namespace, name: str, low: float, high: float = math.inf,
                 low_open: bool = False) -> None:
    value = getattr(args, name, None)
    if value is None:
        return
    flag = "--" + name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise OvdenseError(f"{flag} must be a finite number, got {value}")
    below = value <= low if low_open else value < low
    if below or value > high:
        left = "(" if low_open else "["
        right = "]" if high != math.inf else ")"
        raise OvdenseError(f"{flag} must lie in {left}{low:g}, {high:g}{right}, got {value:g}")


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
                 "box_nms_thresh", "unknown_threshold", "crop_area", "crop_weight"):
        _check_range(args, name, 0, 1)
    _check_range(args, "points_per_side", 1, 1024)
    _check_range(args, "min_mask_region_area", 0)
    _check_range(args, "max_pixels", 1)


def _check_device(device: str) -> None:
    """A device that exists here (imports torch: called after the cheap checks)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise OvdenseError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from e
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OvdenseError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise OvdenseError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise OvdenseError(f"--device {device!r}: ovdense runs on cpu or cuda")


def _list_inputs(inputs: Sequence[str]) -> list[Path]:
    from ovdense.io import list_images

    images = list_images(inputs)
    if not images:
        raise OvdenseError(f"no images found in {' '.join(map(str, inputs))}")
    stems = [p.stem for p in images]
    seen: set[str] = set()
    for stem in stems:
        if stem in seen:
            raise OvdenseError(f"several inputs share the name {stem!r}; their outputs would clash")
        seen.add(stem)
    return images


def _complete(out: Path, stem: str, suffixes: Sequence[str], key: str | None = None) -> bool:
    """Whether an image's outputs are all in ``out``: the last suffix names its JSON, written
    last (atomically), which must parse (and hold ``key`` at its top, where given: ``segment``
    and ``detect`` both write ``<stem>.json``); the others must exist and be non-empty."""
    *others, marker = suffixes
    try:
        report = json.loads((out / f"{stem}{marker}").read_text(encoding="utf-8"))
        if key is not None and not (isinstance(report, dict) and key in report):
            return False
        return all((out / f"{stem}{s}").stat().st_size > 0 for s in others)
    except (OSError, ValueError):
        return False


def _check_no_overwrite(out: Path, images: list[Path], suffixes: Sequence[str]) -> None:
    """Refuse a run whose outputs (``<stem><suffix>`` in ``out``) would replace one of its inputs."""
    inputs = {p.resolve() for p in images}
    for path in images:
        for suffix in suffixes:
            if (out / f"{path.stem}{suffix}").resolve() in inputs:
                raise OvdenseError(f"output {out / (path.stem + suffix)} would overwrite an input")


def _pending(args: argparse.Namespace, images: list[Path], suffixes: Sequence[str],
             key: str | None = None) -> tuple[list[Path], int]:
    """The images still to compute and how many ``--skip-existing`` skips (no image is read)."""
    if not args.skip_existing:
        return images, 0
    todo = [p for p in images if not _complete(args.out, p.stem, suffixes, key)]
    for path in todo:  # temporary files an interrupted run left (ovdense.io.write_bytes names them so)
        for suffix in suffixes:
            for stale in args.out.glob(glob.escape(f".{path.stem}{suffix}.") + "*.tmp"):
                stale.unlink(missing_ok=True)
    return todo, len(images) - len(todo)


def _command_methods() -> int:
    from ovdense.backbone.protocols import METHOD_INFO as METHODS  # torch-free

    print(f"{'method':<10} {'short side':>10} {'window':>9} {'logit scale':>11} {'pamr':>5}  paper")
    for name, spec in METHODS.items():
        p = spec.protocol
        window = f"{p.window[0]}/{p.window[1]}"
        print(f"{name:<10} {p.short_side:>10} {window:>9} {p.logit_scale:>11g} "
              f"{'on' if p.pamr else 'off':>5}  {spec.paper}")
    print("\nheads beyond the training-free ones:")
    print(f"{SAN:<10} {640:>10} {'whole':>9} {'learned':>11} {'off':>5}  Xu et al., CVPR 2023 (SAN): a "
          "trained side adapter; --head-checkpoint (the toy model ships one)")
    print(f"{SAM_CLIP:<10} {'-':>10} {'whole':>9} {'-':>11} {'off':>5}  Kirillov et al., ICCV 2023 (SAM) "
          "masks classified by one dense CLIP pass; --sam-checkpoint")
    print("\ndetection (ovdense detect): boxes and instance masks for any words, F-ViT — Kuo et al., ICLR "
          "2023 (F-VLM), Wu et al., ICLR 2024 (CLIPSelf): a trained head on the frozen backbone, its scores "
          "ensembled with CLIP's region scores; long side 640; --head-checkpoint (the toy model ships one)")
    return 0


SEGMENT_OUTPUTS = ("_labels.png", "_overlay.jpg", ".json")  # the JSON last: the completion marker
SAM_CLIP_OUTPUTS = ("_labels.png", "_overlay.jpg", "_instances.json")
ANOMALY_OUTPUTS = ("_anomaly.npy", "_heatmap.png", "_anomaly.json")


def _command_segment(args: argparse.Namespace) -> int:
    from ovdense.backbone.protocols import METHOD_INFO as METHODS  # torch-free

    sam_clip = args.method == SAM_CLIP
    if not sam_clip and args.method != SAN and args.method not in METHODS:
        raise OvdenseError(f"unknown method {args.method!r}; choose from: {', '.join(METHODS)}, "
                           f"{SAN}, {SAM_CLIP}")
    _check_method_options(args)
    _check_segment_arguments(args)
    if sam_clip and args.clip_method is not None and args.clip_method not in METHODS:
        raise OvdenseError(f"unknown --clip-method {args.clip_method!r}; choose from: {', '.join(METHODS)}")
    if args.head_checkpoint is not None and not args.head_checkpoint.is_file():
        raise OvdenseError(f"--head-checkpoint {args.head_checkpoint}: no such file (a SAN head written "
                           "by tools/train.py or tools/model_converters/san2ovdense.py)")
    vocabulary = _read_classes(args)
    templates = _read_templates(args.templates)
    images = _list_inputs(args.inputs)
    _check_out(args.out)
    suffixes = SAM_CLIP_OUTPUTS if sam_clip else SEGMENT_OUTPUTS
    _check_no_overwrite(args.out, images, suffixes)
    todo, skipped = _pending(args, images, suffixes)
    if not todo:
        return _report(args.out, len(images), [], "result", "", skipped)
    _check_device(args.device)

    from ovdense import Segmenter, create_backbone
    from ovdense.io import overlay, write_image, write_json, write_label_png

    if sam_clip:
        from ovdense.heads.sam_clip import load_sam

        sam = load_sam(args.sam_checkpoint, args.sam_model, device=args.device)  # fails fast
    pretrained = _pretrained(args.model, args.pretrained)
    backbone = create_backbone(args.model, pretrained=pretrained, device=args.device)
    if sam_clip:
        return _run_sam_clip(args, backbone, sam, vocabulary, templates, images, todo, skipped)
    if args.method == SAN:
        from ovdense.heads.san import SanSegmenter

        segmenter = SanSegmenter(backbone, vocabulary, head_checkpoint=args.head_checkpoint,
                                 templates=templates, short_side=args.short_side)
    else:
        segmenter = Segmenter(
            backbone, args.method, vocabulary, templates=templates,
            short_side=args.short_side, window=tuple(args.window) if args.window else None,
            logit_scale=args.logit_scale, bg_threshold=args.bg_threshold,
            area_threshold=args.area_threshold, pamr=args.pamr, kernel=args.kernel,
        )
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "segment", failed, args.max_pixels):
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
                   " (<name>_labels.png, <name>_overlay.jpg, <name>.json)", skipped)


def _run_sam_clip(args: argparse.Namespace, backbone, sam, vocabulary, templates, images, todo,
                  skipped) -> int:

    from ovdense.heads.sam_clip import SamClipSegmenter, draw_instances
    from ovdense.io import write_image, write_json, write_label_png

    options = {name: getattr(args, name) for name in SAM_SEGMENTER_OPTIONS if getattr(args, name) is not None}
    segmenter = SamClipSegmenter(
        backbone, sam, vocabulary, templates=templates, method=args.clip_method or "clearclip",
        short_side=args.short_side, logit_scale=args.logit_scale, **options,
    )
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "sam-clip", failed, args.max_pixels):
        result = segmenter.segment(rgb)
        write_label_png(args.out / f"{path.stem}_labels.png", result.labels)
        write_image(args.out / f"{path.stem}_overlay.jpg", draw_instances(rgb, result))
        write_json(args.out / f"{path.stem}_instances.json", result.to_coco(path.stem))
    return _report(args.out, len(images), failed, "result",
                   " (<name>_labels.png, <name>_overlay.jpg, <name>_instances.json)", skipped)


def _readable_images(images: Sequence[Path], desc: str, failed: list[Path], max_pixels: int | None):
    """Yield ``(path, rgb)`` for each image that loads, with a progress bar; an unreadable one
    (missing, corrupt, over ``max_pixels``) is reported by name, appended to ``failed`` and
    skipped, so the others still run."""
    from tqdm import tqdm

    from ovdense.io import load_image

    for path in tqdm(images, desc=desc, unit="image", file=sys.stderr):
        try:
            rgb = load_image(path, max_pixels=max_pixels)
        except OvdenseError as e:
            tqdm.write(f"ovdense: skipped: {e}", file=sys.stderr)
            failed.append(path)
            continue
        yield path, rgb


def _report(out: Path, total: int, failed: list[Path], what: str, files: str, skipped: int = 0) -> int:
    """Print where results went, how many were already there and how many images failed; the
    exit code (1 if any failed)."""
    done = total - len(failed) - skipped
    print(f"ovdense: wrote {done} {what}{'s' if done != 1 else ''} to {out}/{files}")
    if skipped:
        print(f"ovdense: skipped {skipped} of {total} images whose outputs exist (--skip-existing)")
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


DETECT_OUTPUTS = ("_overlay.jpg", ".json")  # the JSON last: the completion marker


def _read_detect_classes(args: argparse.Namespace) -> list[str]:
    """``--classes`` / ``--classes-file`` as plain names: one word (or phrase) per class, each once."""
    vocabulary = _read_classes(args)
    joined = [words for words in vocabulary.synonyms() if len(words) > 1]
    if joined:
        sep = "'|'" if args.classes is not None else "commas"
        raise OvdenseError(f"detect takes one name per class, got synonyms ({sep}) in "
                           f"{' | '.join(joined[0])!r}; give them as separate classes")
    names = list(vocabulary.names)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise OvdenseError(f"class {name!r} is listed twice; give each class once")
        seen.add(name)
    return names


def _command_detect(args: argparse.Namespace) -> int:
    _check_range(args, "score_threshold", 0, 1)
    _check_range(args, "image_size", 1)
    _check_range(args, "max_pixels", 1)
    if args.head_checkpoint is not None and not args.head_checkpoint.is_file():
        raise OvdenseError(f"--head-checkpoint {args.head_checkpoint}: no such file (an F-ViT head written "
                           "by tools/train.py configs/ovdet/...: work_dirs/<config>/fvit_head.safetensors)")
    if args.head_checkpoint is None and args.model != "toy":
        # only the toy model ships a head (ovdense.heads.detection.default_head_checkpoint): say so
        # before a backbone is downloaded and built
        raise OvdenseError(f"no F-ViT head ships for --model {args.model}: pass --head-checkpoint PATH, a "
                           "head trained with python tools/train.py configs/ovdet/<config>.py "
                           "(work_dirs/<config>/fvit_head.safetensors); only --model toy ships one")
    classes = _read_detect_classes(args)
    images = _list_inputs(args.inputs)
    _check_out(args.out)
    _check_no_overwrite(args.out, images, DETECT_OUTPUTS)
    todo, skipped = _pending(args, images, DETECT_OUTPUTS, key="detections")
    if not todo:
        return _report(args.out, len(images), [], "result", "", skipped)
    _check_device(args.device)

    from ovdense import create_backbone
    from ovdense.heads.fvit import Detector
    from ovdense.io import draw_detections, write_image, write_json

    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    detector = Detector(backbone, classes, head_checkpoint=args.head_checkpoint,
                        score_threshold=args.score_threshold, image_size=args.image_size,
                        ensemble=args.ensemble)
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "detect", failed, args.max_pixels):
        result = detector.predict(rgb)
        write_image(args.out / f"{path.stem}_overlay.jpg", draw_detections(rgb, result))
        write_json(args.out / f"{path.stem}.json", result.to_json())
    return _report(args.out, len(images), failed, "result", " (<name>.json, <name>_overlay.jpg)", skipped)


def _command_anomaly(args: argparse.Namespace) -> int:
    if not args.object.strip():
        raise OvdenseError("the object name is empty: say what the images show, e.g. --object bottle")
    _check_range(args, "max_pixels", 1)
    images = _list_inputs(args.inputs)
    _check_out(args.out)
    references = _reference_images(args)
    todo, skipped = _pending(args, images, ANOMALY_OUTPUTS)
    if not todo:
        return _report(args.out, len(images), [], "anomaly map", "", skipped)
    _check_device(args.device)

    import numpy as np

    from ovdense import create_backbone
    from ovdense.anomaly.winclip import WinClip
    from ovdense.io import heatmap_overlay, load_image, write_bytes, write_image, write_json

    arrays = [load_image(p, max_pixels=args.max_pixels) for p in references]  # before the model
    backbone = create_backbone(args.model, pretrained=_pretrained(args.model, args.pretrained),
                               device=args.device)
    winclip = WinClip(backbone, args.object, prompt_set=args.prompt_set)
    if references:
        winclip.set_references(arrays)
    failed: list[Path] = []
    for path, rgb in _readable_images(todo, "anomaly", failed, args.max_pixels):
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
    return _report(args.out, len(images), failed, "anomaly map", "", skipped)


def _reference_images(args: argparse.Namespace) -> list[Path]:
    """The first ``--shots`` images of ``--reference`` (none without it)."""
    from ovdense.io import list_images

    if args.reference is None:
        if args.shots is not None:
            raise OvdenseError("--shots needs --reference FOLDER (the normal images of WinCLIP+)")
        return []
    if args.reference.is_file():
        raise OvdenseError(f"--reference {args.reference} is a file; give the folder of normal images")
    if not args.reference.is_dir():
        raise OvdenseError(f"reference folder not found: {args.reference}")
    references = list_images([args.reference])
    shots = 1 if args.shots is None else args.shots
    if shots < 1 or shots > len(references):
        raise OvdenseError(f"--shots {shots} asked, the reference folder has {len(references)} images")
    return references[:shots]


def _command_anomaly_eval(args: argparse.Namespace) -> int:
    import csv
    import io as _io

    from ovdense.anomaly.evaluate import check_dataset

    if args.shots < 0:
        raise OvdenseError(f"--shots must be ≥ 0 (0 = zero-shot WinCLIP), got {args.shots}")
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
                       max_pixels=args.max_pixels)
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
    import warnings

    args = _build_parser().parse_args(argv)
    # torch's note on pickle protocols (met when a non-checkpoint is read as one) advises filing an
    # issue; the file is refused with one line below instead
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
        if args.command == "methods":
            return _command_methods()
        if args.command == "anomaly":
            return _command_anomaly(args)
        if args.command == "anomaly-eval":
            return _command_anomaly_eval(args)
        if args.command == "detect":
            return _command_detect(args)
        return _command_segment(args)
    except OvdenseError as e:
        message = " ".join(strip_unpickling_advice(str(e)).split())
        print(f"ovdense: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovdense: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
