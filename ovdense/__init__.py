"""ovdense: open-vocabulary dense prediction on one CLIP backbone.

    import ovdense
    backbone = ovdense.create_backbone("ViT-B-16", pretrained="openai")
    segmenter = ovdense.Segmenter(backbone, "clearclip", ["sky", "tree", "person, man, woman"])
    result = segmenter.predict("street.jpg")   # result.labels: [H, W], result.scores: [H, W]

Every head, by name, from one registry (``ovdense.registry``):

    ovdense.list_heads()                        # segmentation, detection and anomaly heads
    head = ovdense.create_head("san", backbone, ["sky", "tree"], head_checkpoint="san_head.safetensors")
    head.predict("street.jpg").save("outputs", "street", "street.jpg")

The public names load on first use (PEP 562), so ``import ovdense`` and the command line's
``--help`` start without torch or open_clip.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ovdense.errors import OvdenseError
from ovdense.version import __version__

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ovdense.anomaly.adaptclip import AdaptClip
    from ovdense.anomaly.winclip import AnomalyResult, WinClip
    from ovdense.backbone.clip import ClipBackbone, create_backbone
    from ovdense.backbone.prompts import Vocabulary
    from ovdense.heads.fvit import DetectionResult, Detector
    from ovdense.heads.sam_clip import SamClipSegmenter
    from ovdense.heads.san import SanSegmenter
    from ovdense.heads.training_free import SegmentationResult, Segmenter
    from ovdense.registry import HEADS, create_head, list_heads

# public name → the module that defines it, imported on first access
_LAZY = {
    "ClipBackbone": "ovdense.backbone.clip",
    "create_backbone": "ovdense.backbone.clip",
    "METHODS": "ovdense.backbone.dense",
    "Vocabulary": "ovdense.backbone.prompts",
    "SegmentationResult": "ovdense.heads.training_free",
    "Segmenter": "ovdense.heads.training_free",
    "SanSegmenter": "ovdense.heads.san",
    "SamClipSegmenter": "ovdense.heads.sam_clip",
    "Detector": "ovdense.heads.fvit",
    "DetectionResult": "ovdense.heads.fvit",
    "WinClip": "ovdense.anomaly.winclip",
    "AnomalyResult": "ovdense.anomaly.winclip",
    "AdaptClip": "ovdense.anomaly.adaptclip",
    "HEADS": "ovdense.registry",
    "create_head": "ovdense.registry",
    "list_heads": "ovdense.registry",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ovdense' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def list_methods() -> list[str]:
    """The names of the training-free methods."""
    from ovdense.backbone.protocols import METHOD_INFO

    return list(METHOD_INFO)


__all__ = [
    "AdaptClip",
    "AnomalyResult",
    "ClipBackbone",
    "DetectionResult",
    "Detector",
    "HEADS",
    "OvdenseError",
    "SamClipSegmenter",
    "SanSegmenter",
    "SegmentationResult",
    "Segmenter",
    "Vocabulary",
    "WinClip",
    "__version__",
    "create_backbone",
    "create_head",
    "list_heads",
    "list_methods",
]
