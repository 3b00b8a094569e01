"""The official code beside the VFMs, read from mirrors, for the tests that compare ovdense with it
(tests/test_vfm.py: facebookresearch/dino and dinov2; tests/test_proxyclip.py: mc-lan/ProxyCLIP with its
bundled open_clip). Each ``OVDENSE_*_REPO`` names a mirror (a bare git repository, or a clone); without
it the tests that need it skip."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch
from official_clim import mirror_checkout

from ovdense.backbone.vfm import IMAGENET_MEAN, IMAGENET_STD

DINO_REPO = Path(os.environ.get("OVDENSE_DINO_REPO", "/work/.mirror/facebookresearch+dino/repo"))
DINOV2_REPO = Path(os.environ.get("OVDENSE_DINOV2_REPO", "/work/.mirror/facebookresearch+dinov2/repo"))
PROXYCLIP_REPO = Path(os.environ.get("OVDENSE_PROXYCLIP_REPO", "/work/.mirror/mc-lan+ProxyCLIP/repo"))


def imagenet(rgb: torch.Tensor) -> torch.Tensor:
    """The official pipelines' input: torchvision's Normalize with ImageNet statistics."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


def spread(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (the official inits leave tokens, positions and LayerScale at
    constants that would hide a wrong key or a wrong position rule)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if ("norm" in name and name.endswith("weight")) else 0.05
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=generator))


def import_official_dino(dest: Path):
    """The official ``vision_transformer`` module of facebookresearch/dino (what its hub builds)."""
    tree = mirror_checkout(DINO_REPO, dest, ("vision_transformer.py", "utils.py"), "OVDENSE_DINO_REPO")
    sys.path.insert(0, str(tree))
    try:
        import vision_transformer as vits
    finally:
        sys.path.remove(str(tree))
        sys.modules.pop("utils", None)
    return vits


def import_official_dinov2(dest: Path):
    """The official ``dinov2.models.vision_transformer`` of facebookresearch/dinov2 (xFormers off)."""
    tree = mirror_checkout(DINOV2_REPO, dest, ("dinov2/__init__.py", "dinov2/layers", "dinov2/models"),
                           "OVDENSE_DINOV2_REPO")
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    sys.path.insert(0, str(tree))
    try:
        from dinov2.models import vision_transformer as vits
    finally:
        sys.path.remove(str(tree))
    return vits


def official_dinov2_vitb14_reg(vits) -> torch.nn.Module:
    """What the hub's ``dinov2_vitb14_reg`` builds (hubconf ``_make_dinov2_model``), random weights."""
    return vits.vit_base(patch_size=14, img_size=518, init_values=1.0, ffn_layer="mlp", block_chunks=0,
                         num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0).eval()


def _is_open_clip(name: str) -> bool:
    return name == "open_clip" or name.startswith("open_clip.")


def import_proxyclip(dest: Path):
    """``proxyclip_segmentor`` of mc-lan/ProxyCLIP run as is, with its bundled open_clip as ``open_clip``
    during the import only (pip's stays ``open_clip`` for ovdense; the segmentor keeps references to the
    fork's ``create_model`` and ``tokenizer``), its bundled segment_anything, prompts and mae. Only
    ``openpyxl`` (its Excel report in ``myutils``, not used by the segmentor) is stubbed when absent.

    Returns ``(segmentor module, the fork's open_clip)``."""
    tree = mirror_checkout(PROXYCLIP_REPO, dest, ("proxyclip_segmentor.py", "open_clip", "prompts", "mae",
                                                  "myutils.py", "segment_anything"), "OVDENSE_PROXYCLIP_REPO")
    import ovdense.backbone.clip  # noqa: F401 - ovdense binds pip's open_clip first

    if "proxyclip_segmentor" in sys.modules:
        module = sys.modules["proxyclip_segmentor"]
        return module, module._fork
    if "openpyxl" not in sys.modules:
        try:
            import openpyxl  # noqa: F401
        except ImportError:
            sys.modules["openpyxl"] = types.ModuleType("openpyxl")
    own = {name: sys.modules.pop(name) for name in list(sys.modules)
           if _is_open_clip(name) or name == "segment_anything" or name.startswith("segment_anything.")}
    sys.path.insert(0, str(tree))
    try:
        import open_clip as fork
        import proxyclip_segmentor as module
    finally:
        for name in [n for n in sys.modules if _is_open_clip(n) or n.startswith("segment_anything")]:
            sys.modules.pop(name)
        sys.path.remove(str(tree))
        sys.modules.update(own)
    module._fork = fork
    return module, fork
