"""The ``ovdense`` argument parser: every subcommand and flag, and argparse's errors as one line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ovdense.registry import DEFAULT_HEADS, HEADS, list_heads

MAX_PIXELS = 100_000_000  # = ovdense.io.MAX_PIXELS (not imported: io imports numpy and PIL)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: ``ovdense: error: ...`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"ovdense: error: {message} (see `{self.prog} --help`)\n")


#: the VFMs ``ovdense.backbone.vfm`` builds (a torch-free copy of its keys; tests/test_cli_flags.py checks it)
VFM_NAMES = ("dino_vitb8", "dino_vitb16", "dino_vits8", "dinov2_vitb14_reg", "sam_vit_b")


def _group_title(option: str, what: str) -> str:
    """``"SAN (--method san)"``: the segmentation heads that take ``option``, for a flag group's title."""
    heads = [HEADS[name] for name in list_heads("segmentation") if option in HEADS[name].options]
    titles = " / ".join(entry.title for entry in heads) or what
    return f"{titles} ({', '.join(f'--method {entry.name}' for entry in heads)})"


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ovdense", description="Open-vocabulary dense prediction on a CLIP backbone."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seg = sub.add_parser(
        "segment",
        help="segment images with any list of words",
        description="Segment images with a training-free method, a trained head or SAM masks classified "
        "by CLIP (`ovdense methods` lists them). For each image writes "
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
    seg.add_argument("--method",
                     help=f"one of {', '.join(list_heads('segmentation'))} (default: the model's own, "
                     f"from its config's 'ovdense' entry, e.g. the toy model's; else "
                     f"{DEFAULT_HEADS['segmentation']}); see `ovdense methods`")
    seg.add_argument(
        "--model", default="ViT-B-16",
        help="open_clip model name, 'toy', 'toy-clipself', or a JSON model config"
    )
    seg.add_argument(
        "--pretrained",
        help="open_clip tag or checkpoint file; 'none' = random weights (default: 'openai' for "
        "open_clip models, the embedded weights for the toy models, random for a JSON config)",
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
    san = seg.add_argument_group(_group_title("head_checkpoint", "trained heads"),
                                 "a trained head on the backbone")
    san.add_argument("--head-checkpoint", type=Path,
                     help="a trained head (san_head.safetensors / clipseg_head.safetensors from "
                     "tools/train.py, or converted by tools/model_converters/; default for --model toy: "
                     "the shipped one)")
    found = seg.add_argument_group(_group_title("found_background", "a learned background"),
                                   "the learned background filter on class 0")
    found_flag = found.add_mutually_exclusive_group()
    found_flag.add_argument("--found-background", dest="found_background", action="store_true", default=None,
                            help="class 0 wins where the head sees background (default: on when class 0 is "
                            "named 'background', as the official VOC and COCO-Object evaluations)")
    found_flag.add_argument("--no-found-background", dest="found_background", action="store_false")
    fusion = seg.add_argument_group(_group_title("select_layer", "early-layer fusion"),
                                    "CLIP's early attention fused into its last block (no diffusion step)")
    fusion.add_argument("--select-layer", type=int,
                        help="the block whose class maps the fused attention smooths (default -1, the last)")
    fusion.add_argument("--attention-threshold", type=float,
                        help="zero class-map values below this fraction of the class's maximum (default 0.2)")
    fusion.add_argument("--score-threshold", type=float,
                        help="drop classes whose map peaks at or below this (default 0.3)")
    normalize = fusion.add_mutually_exclusive_group()
    normalize.add_argument("--normalize-maps", dest="normalize_maps", action="store_true", default=None,
                           help="min-max normalise each class map before the background threshold")
    normalize.add_argument("--no-normalize-maps", dest="normalize_maps", action="store_false")
    clipseg = seg.add_argument_group(_group_title("image_prompt", "image prompts"),
                                     "classes named by an example image")
    clipseg.add_argument("--image-prompt", action="append", metavar="NAME=IMAGE[:MASK]",
                         help="a class named by an example: IMAGE shows it, MASK (an image of the same size, "
                         "non-zero on the object) marks it, the whole image without one; repeatable")
    vfm = seg.add_argument_group(_group_title("vfm", "a second vision model"),
                                 "a vision foundation model beside CLIP tells which patches belong together")
    vfm.add_argument("--vfm", choices=list(VFM_NAMES),
                     help="the vision model (default dino_vitb8, ProxyCLIP's choice for its tables)")
    vfm.add_argument("--vfm-weights", type=Path,
                     help="its official weights file (dino_vitbase8_pretrain.pth, ...; 'none' = random "
                     "weights, for tests): nothing is downloaded")
    _add_sam_clip_arguments(seg)
    _add_detect_parser(sub)

    sub.add_parser("methods", help="list every head: the segmentation methods and their defaults, the "
                   "detectors and the anomaly heads")

    anomaly = sub.add_parser(
        "anomaly", help="defect heat maps with WinCLIP (zero-shot), WinCLIP+ (few-shot) or AdaptCLIP",
        description="For each image writes <stem>_anomaly.npy (float32 map), "
        "<stem>_heatmap.png (overlay) and <stem>_anomaly.json (image score).",
    )
    anomaly.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    anomaly.add_argument("--object", help="what the images show, e.g. bottle (WinCLIP's prompts; AdaptCLIP "
                         "says 'object' for every category)")
    anomaly.add_argument("--reference", "--normal", dest="reference", type=Path,
                         help="folder of normal images (WinCLIP+, few-shot AdaptCLIP)")
    anomaly.add_argument("--shots", type=int, help="reference images to use (default 1; needs --reference)")
    anomaly.add_argument("--method", choices=list_heads("anomaly"),
                         help="the anomaly head (see `ovdense methods`; default: "
                         f"{DEFAULT_HEADS['anomaly']}, or the head that takes references with --reference)")
    _add_anomaly_head_argument(anomaly)
    _add_anomaly_model_arguments(anomaly)
    anomaly.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    _add_batch_arguments(anomaly)

    evaluation = sub.add_parser("anomaly-eval", help="WinCLIP or AdaptCLIP metrics on MVTec AD or VisA")
    evaluation.add_argument("--dataset", required=True, choices=("mvtec", "visa"))
    evaluation.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    evaluation.add_argument("--method", choices=("winclip", "adaptclip"), default="winclip",
                            help="winclip (WinCLIP+ with --shots) or adaptclip (default winclip)")
    evaluation.add_argument("--shots", type=int, default=0,
                            help="normal training images per category as references (0 = zero-shot)")
    evaluation.add_argument("--reference-seed", type=int,
                            help="draw the references with this seed (default: the first --shots by name)")
    evaluation.add_argument("--categories", nargs="+", help="default: all")
    _add_anomaly_head_argument(evaluation)
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
    det.add_argument("--method", choices=list_heads("detection"), default=DEFAULT_HEADS["detection"],
                     help=f"the detection head (see `ovdense methods`; default {DEFAULT_HEADS['detection']})")
    vocab = det.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--classes", help="comma-separated class names, e.g. 'red circle,blue star'")
    vocab.add_argument("--classes-file", type=Path, help="one class name per line")
    det.add_argument("--model", default="ViT-B-16",
                     help="open_clip model name, 'toy', 'toy-clipself', or a JSON model config "
                     "(the head's backbone)")
    det.add_argument(
        "--pretrained",
        help="open_clip tag or checkpoint file; 'none' = random weights (default: 'openai' for "
        "open_clip models, the embedded weights for the toy models, random for a JSON config)",
    )
    det.add_argument("--head-checkpoint", type=Path,
                     help="an F-ViT head (fvit_head.safetensors from tools/train.py configs/ovdet/...; "
                     "default for --model toy and toy-clipself: the shipped one)")
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
        _group_title("sam_checkpoint", "SAM masks"),
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




def _add_anomaly_head_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head-checkpoint", type=Path,
                        help="AdaptCLIP's adapters (adaptclip_head.safetensors from tools/train.py, or "
                        "converted by tools/model_converters/adaptclip2ovdense.py; default for --model toy: "
                        "the shipped ones)")


def _add_anomaly_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip ViT, 'toy' or a JSON config")
    parser.add_argument("--pretrained", help="tag or file (default: laion400m_e31, the paper's)")
    parser.add_argument("--prompt-set", default="paper", choices=("paper", "anomalib"))
    parser.add_argument("--device", default="cpu")

