"""ovdense: open-vocabulary dense prediction on one CLIP backbone.

    import ovdense
    backbone = ovdense.create_backbone("ViT-B-16", pretrained="openai")
    segmenter = ovdense.Segmenter(backbone, "clearclip", ["sky", "tree", "person, man, woman"])
    result = segmenter.predict("street.jpg")   # result.labels: [H, W], result.scores: [H, W]
"""

from ovdense.backbone.clip import ClipBackbone, create_backbone
from ovdense.backbone.dense import METHODS
from ovdense.backbone.prompts import Vocabulary
from ovdense.errors import OvdenseError
from ovdense.heads.training_free import SegmentationResult, Segmenter
from ovdense.version import __version__


def list_methods() -> list[str]:
    """The names of the training-free methods."""
    return list(METHODS)


__all__ = [
    "ClipBackbone",
    "OvdenseError",
    "SegmentationResult",
    "Segmenter",
    "Vocabulary",
    "__version__",
    "create_backbone",
    "list_methods",
]
