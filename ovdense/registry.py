"""Every head of ovdense by name: the one table that the Python API, the command line, the demo,
``ovdense methods`` and the mm configs read.

    import ovdense
    backbone = ovdense.create_backbone("toy")
    head = ovdense.create_head("clearclip", backbone, ["background", "red circle"])
    result = head.predict("scene.png")          # result.to_json(), result.overlay(rgb), result.save(...)
    ovdense.list_heads("segmentation")          # ['vanilla', 'maskclip', ..., 'san', 'sam-clip']

One calling shape per kind (``KIND_ARGUMENTS``): a segmentation or detection head is built as
``target(backbone, classes=classes, **options)``, an anomaly head as
``target(backbone, object_name=object_name, **options)``. Segmentation and detection heads
answer ``predict(image)`` with one result; an anomaly head's ``predict`` takes one image or a
list and answers a list. Every result has ``to_json()``, ``overlay(image)`` (RGB ``uint8``) and
``save(out_dir, stem, image)``, which writes the files ``outputs`` names, the JSON last.

No torch here: each ``target`` is a ``"module:attribute"`` string imported when a head is built,
so ``import ovdense``, ``ovdense --help`` and ``ovdense methods`` stay light.

Adding a head: write its file in ``ovdense/heads/`` (or ``ovdense/anomaly/``) with a class that
takes the kind's arguments and returns a result with the three methods, then add one
``HeadEntry`` to ``_ENTRIES`` below. The command line (``--method``, ``ovdense methods``) and the
demo's menus pick it up from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module
from types import MappingProxyType
from typing import Any

from ovdense.backbone.protocols import METHOD_INFO
from ovdense.errors import OvdenseError

#: the kinds of head and the arguments each is built with after the backbone
KIND_ARGUMENTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "segmentation": ("classes",),
    "detection": ("classes",),
    "anomaly": ("object_name",),
})

#: the head the command line uses for a kind when none is named (``--method``'s default)
DEFAULT_HEADS: Mapping[str, str] = MappingProxyType({
    "segmentation": "clearclip",
    "detection": "fvit",
    "anomaly": "winclip",
})

# The module of the F-ViT detector: its ``Detector``, ``default_head_checkpoint`` and ``load_head``.
_FVIT_MODULE = "ovdense.heads.fvit"


@dataclass(frozen=True)
class HeadEntry:
    """One head: how to build it and how to describe it.

    Attributes:
        name: the name users type (``--method``, ``create_head``).
        kind: ``"segmentation"``, ``"detection"`` or ``"anomaly"`` (``KIND_ARGUMENTS``).
        target: ``"module:attribute"`` of the class (or function) that builds the head.
        title: the head's short display name (``"SAN"``, ``"ClearCLIP"``).
        summary: what it does, one line.
        paper: authors, venue and year.
        fixed: keyword arguments the target always gets (the training-free method's name).
        options: the head's own options, by their command-line names (``args`` attributes):
            any other option of its command is refused for this head.
        required: keyword arguments ``create_head`` must be given (``winclip+``: references).
        accepts: keyword arguments a command may give it (``adaptclip``: references, few-shot).
        needs: what the head needs beyond the backbone that a caller supplies, by keyword
            (``sam``: a segment-anything model).
        checkpoints: for a trained head, the module whose ``default_head_checkpoint(backbone)``
            names the head that ships for a backbone and whose ``load_head(path, backbone)``
            reads one; ``None`` for a training-free head.
        outputs: the suffixes of the files ``result.save(out_dir, stem, image)`` writes (the
            JSON, the completion mark, last).
        table: ``(short side, window, logit scale, pamr)`` in ``ovdense methods`` (segmentation).
        hint: the command-line flags to mention in ``ovdense methods``.
        option_hint: added to the error for an option of another head.
    """

    name: str
    kind: str
    target: str
    title: str
    summary: str
    paper: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    accepts: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    checkpoints: str | None = None
    outputs: tuple[str, ...] = ()
    table: tuple[str, str, str, str] | None = None
    hint: str = ""
    option_hint: str = ""

    @property
    def trained(self) -> bool:
        """Whether the head has trained weights (a checkpoint)."""
        return self.checkpoints is not None

    @property
    def training_free(self) -> bool:
        return "method" in self.fixed

    @property
    def arguments(self) -> tuple[str, ...]:
        """The arguments after the backbone, in order (``KIND_ARGUMENTS``)."""
        return KIND_ARGUMENTS[self.kind]

    def load(self):
        """The class (or function) that builds the head (imports its module)."""
        module, _, attribute = self.target.partition(":")
        return getattr(import_module(module), attribute)

    def shipped_checkpoint(self, backbone):
        """The trained head that ships for ``backbone``, or ``None`` (none ships, or the head
        is training-free)."""
        if self.checkpoints is None:
            return None
        try:
            return import_module(self.checkpoints).default_head_checkpoint(backbone)
        except OvdenseError:
            return None

    def load_checkpoint(self, path, backbone):
        """Read a trained head's checkpoint for ``backbone`` (raises ``OvdenseError`` for a wrong one)."""
        return import_module(self.checkpoints).load_head(path, backbone)


_SEGMENT_OUTPUTS = ("_labels.png", "_overlay.jpg", ".json")
_TRAINING_FREE_OPTIONS = ("window", "logit_scale", "bg_threshold", "area_threshold", "pamr", "kernel")
_VFM_OPTIONS = ("vfm", "vfm_weights")
_SAM_OPTIONS = ("sam_checkpoint", "sam_model", "clip_method", "logit_scale", "points_per_side",
                "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "min_mask_region_area",
                "unknown_threshold", "crop_area", "crop_weight")


def _training_free(name: str) -> HeadEntry:
    info = METHOD_INFO[name]
    p = info.protocol
    title = re.search(r"\(([^)]*)\)\s*$", info.paper)
    vfm = "vfm" in info.needs
    options = _TRAINING_FREE_OPTIONS + (_VFM_OPTIONS if vfm else ())
    return HeadEntry(
        name, "segmentation", "ovdense.heads.training_free:Segmenter",
        title=title.group(1) if title else name, summary=f"training-free: {info.change}", paper=info.paper,
        fixed=MappingProxyType({"method": name}), options=options,
        needs=info.needs, hint="--vfm NAME --vfm-weights PATH" if vfm else "", outputs=_SEGMENT_OUTPUTS,
        table=(str(p.short_side), f"{p.window[0]}/{p.window[1]}", f"{p.logit_scale:g}",
               "on" if p.pamr else "off"),
    )


_ENTRIES: tuple[HeadEntry, ...] = (
    *(_training_free(name) for name in METHOD_INFO),
    HeadEntry(
        "san", "segmentation", "ovdense.heads.san:SanSegmenter", title="SAN",
        summary="a trained side adapter", paper="Xu et al., CVPR 2023 (SAN)",
        options=("head_checkpoint",), checkpoints="ovdense.heads.san", outputs=_SEGMENT_OUTPUTS,
        table=("640", "whole", "learned", "off"), hint="--head-checkpoint (the toy model ships one)",
    ),
    HeadEntry(
        "clipseg", "segmentation", "ovdense.heads.clipseg:ClipSegSegmenter", title="CLIPSeg",
        summary="a trained decoder on three taps, steered by each word's (or example's) CLIP embedding",
        paper="Lüddecke & Ecker, CVPR 2022 (CLIPSeg)",
        options=("head_checkpoint", "bg_threshold", "image_prompt"), checkpoints="ovdense.heads.clipseg",
        outputs=("_labels.png", "_overlay.jpg", "_prob_0.png", ".json"),  # and _prob_<k>.png per class
        table=("352×352", "whole", "-", "off"),
        hint="--head-checkpoint (the toy model ships one), --bg-threshold",
    ),
    HeadEntry(
        "clipdinoiser", "segmentation", "ovdense.heads.clipdinoiser:ClipDinoiserSegmenter",
        title="CLIP-DINOiser",
        summary="MaskCLIP's features pooled over the patch correlations that two trained convolutions "
        "learned from DINO, and FOUND's background rule",
        paper="Wysoczańska et al., ECCV 2024 (CLIP-DINOiser)",
        options=("head_checkpoint", "window", "bg_threshold", "found_background"),
        checkpoints="ovdense.heads.clipdinoiser", outputs=_SEGMENT_OUTPUTS,
        table=("448", "448/224", "100", "off"),
        hint="--head-checkpoint (the official checkpoints/last.pt through "
        "tools/model_converters/clipdinoiser2ovdense.py)",
    ),
    HeadEntry(
        "cliper", "segmentation", "ovdense.heads.cliper:CliperSegmenter", title="CLIPer",
        summary="training-free: the attention of CLIP's early blocks, fused, replaces the last block's on "
        "every block's features; classes scored against background words (no diffusion refinement)",
        paper="Sun et al., ICCV 2025 (CLIPer)",
        options=("window", "logit_scale", "bg_threshold", "select_layer", "attention_threshold",
                 "score_threshold", "normalize_maps"),
        outputs=_SEGMENT_OUTPUTS, table=("336", "0/0", "100", "off"),
        hint="class 0 is 'background' (its synonyms: background words); --select-layer, "
        "--attention-threshold, --score-threshold",
    ),
    HeadEntry(
        "sam-clip", "segmentation", "ovdense.heads.sam_clip:SamClipSegmenter", title="SAM + CLIP",
        summary="masks classified by one dense CLIP pass", paper="Kirillov et al., ICCV 2023 (SAM)",
        options=_SAM_OPTIONS, needs=("sam",), outputs=("_labels.png", "_overlay.jpg", "_instances.json"),
        table=("-", "whole", "-", "off"), hint="--sam-checkpoint",
        option_hint=" (SAM + CLIP uses --unknown-threshold)",
    ),
    HeadEntry(
        "fvit", "detection", f"{_FVIT_MODULE}:Detector", title="F-ViT",
        summary="a trained head on the frozen backbone, its scores ensembled with CLIP's region scores; "
        "long side 640",
        paper="Kuo et al., ICLR 2023 (F-VLM), Wu et al., ICLR 2024 (CLIPSelf)",
        options=("head_checkpoint", "score_threshold", "image_size", "ensemble"), checkpoints=_FVIT_MODULE,
        outputs=("_overlay.jpg", ".json"), hint="--head-checkpoint (the toy model ships one)",
    ),
    HeadEntry(
        "winclip", "anomaly", "ovdense.anomaly.winclip:WinClip", title="WinCLIP",
        summary="zero-shot defect maps: multi-scale windows scored against normal and anomalous prompts",
        paper="Jeong et al., CVPR 2023 (WinCLIP)", options=("prompt_set",),
        outputs=("_anomaly.npy", "_heatmap.png", "_anomaly.json"), hint="--object NAME",
    ),
    HeadEntry(
        "winclip+", "anomaly", "ovdense.anomaly.winclip:WinClip", title="WinCLIP+",
        summary="few-shot: WinCLIP plus the distance to the windows and patches of normal reference images",
        paper="Jeong et al., CVPR 2023 (WinCLIP)", options=("prompt_set",), required=("references",),
        outputs=("_anomaly.npy", "_heatmap.png", "_anomaly.json"), hint="--object NAME --reference DIR",
    ),
    HeadEntry(
        "adaptclip", "anomaly", "ovdense.anomaly.adaptclip:AdaptClip", title="AdaptCLIP",
        summary="trained adapters (textual, visual, prompt-query) that carry to unseen categories; "
        "zero-shot, few-shot with normal images",
        paper="Gao et al., AAAI 2026 (AdaptCLIP)", options=("head_checkpoint",), accepts=("references",),
        checkpoints="ovdense.anomaly.adaptclip", outputs=("_anomaly.npy", "_heatmap.png", "_anomaly.json"),
        hint="--head-checkpoint (the toy model ships one) [--normal DIR --shots K]",
    ),
)

_HEADS: dict[str, HeadEntry] = {entry.name: entry for entry in _ENTRIES}
#: name → ``HeadEntry``, in the order ``ovdense methods`` lists them (a read-only view)
HEADS: Mapping[str, HeadEntry] = MappingProxyType(_HEADS)


def list_heads(kind: str | None = None) -> list[str]:
    """The names of the registered heads, of one kind (``KIND_ARGUMENTS``) or all."""
    if kind is not None and kind not in KIND_ARGUMENTS:
        raise OvdenseError(f"unknown kind of head {kind!r}; choose from: {', '.join(KIND_ARGUMENTS)}")
    return [name for name, entry in HEADS.items() if kind is None or entry.kind == kind]


def get_head(name: str, kind: str | None = None) -> HeadEntry:
    """The entry of head ``name`` (of ``kind``, if given).

    Raises:
        OvdenseError: an unknown name (or one of another kind); the message lists the known ones.
    """
    entry = HEADS.get(name)
    if entry is None or (kind is not None and entry.kind != kind):
        known = list_heads(kind)
        raise OvdenseError(f"unknown method {name!r}; choose from: {', '.join(known)}")
    return entry


def default_head(kind: str, given: set[str] | frozenset[str] = frozenset()) -> HeadEntry:
    """The head a command uses when it names none: the first head of ``kind`` whose required
    options are all among the ``given`` names (``winclip+`` when references are given), else the
    kind's default (``DEFAULT_HEADS``)."""
    for name in list_heads(kind):
        entry = HEADS[name]
        if entry.required and set(entry.required) <= set(given):
            return entry
    return HEADS[DEFAULT_HEADS[kind]]


def create_head(name: str, backbone, *args, **options):
    """Build head ``name`` on ``backbone``.

    ``args`` are the kind's arguments (``KIND_ARGUMENTS``): ``classes`` for a segmentation or
    detection head, ``object_name`` for an anomaly head (each may also be given by keyword);
    ``options`` are the head's own keyword arguments (its class's docstring lists them), e.g.
    ``create_head("san", backbone, classes, head_checkpoint="san_head.safetensors")`` or
    ``create_head("sam-clip", backbone, classes, sam=load_sam(path))``.

    Raises:
        OvdenseError: an unknown name (the message lists the known heads), too many arguments,
            an option the name fixes, or a required option left out.
    """
    entry = get_head(name)
    if len(args) > len(entry.arguments):
        raise OvdenseError(f"{name} takes (backbone, {', '.join(entry.arguments)}, **options); got "
                           f"{len(args)} positional arguments after the backbone")
    named = dict(zip(entry.arguments, args))
    twice = sorted(set(named) & set(options))
    fixed = sorted(set(entry.fixed) & set(options))
    if twice or fixed:
        what = twice[0] if twice else fixed[0]
        why = "given twice" if twice else f"set by the head's name ({what}={entry.fixed[what]!r})"
        raise OvdenseError(f"{name}: {what} is {why}")
    missing = [key for key in entry.required if options.get(key) is None]
    if missing:
        raise OvdenseError(f"{name} needs {' and '.join(missing)}=...; {entry.summary}")
    return entry.load()(backbone, **named, **entry.fixed, **options)
