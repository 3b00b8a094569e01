"""The training-free methods as data: each one's paper, what it changes in the last block, and
its official inference defaults (``Protocol``). No torch here, so ``ovdense methods`` and
``import ovdense`` can list them without loading a model; ``dense.METHODS`` adds each method's
last-block function to this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Protocol:
    """A method's inference defaults for ViT-B/16, from its official repository (per-dataset
    thresholds and scales go in configs). ``vanilla`` takes SCLIP's protocol, which the later
    papers use to re-evaluate the baselines. ``maskclip`` takes its repo's whole-image inference
    at short side 512, but keeps CLIP's own normalisation, GELU and LayerNorm eps where the
    MaskCLIP code (an mmseg 0.x re-implementation of the ViT) used ImageNet statistics, exact
    GELU and eps 1e-6; its head has no temperature, so the logit scale only matters for
    ``bg_threshold``.

    Attributes:
        short_side: resize the short side to this (mmseg ``Resize(scale=(2048, s))``).
        window: ``(crop, stride)`` of the sliding window; ``(0, 0)`` is one whole-image pass.
        logit_scale: the softmax temperature factor.
        pamr: PAMR refinement on (dilations (8, 16), 10 steps, as in all the repos).
        image_engineering: ITACLIP's test-time image variants.
        close_labels: ITACLIP's 3×3 morphological closing of the label map.
        cluster: CLIPtrase's DBSCAN patch clustering.
        pad_multiple: windows are zero-padded (centred) to multiples of this; ``0`` = the CLIP
            patch size. ProxyCLIP pads to 56, a multiple of the 8 and 14 px patches of its
            VFMs; CLIP's patch embedding then drops a partial last patch, as its convolution does.
    """

    short_side: int = 336
    window: tuple[int, int] = (224, 112)
    logit_scale: float = 40.0
    pamr: bool = False
    image_engineering: bool = False
    close_labels: bool = False
    cluster: bool = False
    pad_multiple: int = 0


@dataclass(frozen=True)
class MethodInfo:
    """A training-free method without its code: the paper, the last block's change in a few
    words, the official defaults, the earlier blocks (0-indexed) whose self-self attention
    maps the last block needs (``capture``, ITACLIP), and what it needs beside the backbone
    (``needs``: ``"vfm"``, a second vision model, ``ovdense.backbone.vfm``)."""

    paper: str
    change: str
    protocol: Protocol = field(default_factory=Protocol)
    capture: tuple[int, ...] = ()
    needs: tuple[str, ...] = ()


METHOD_INFO: dict[str, MethodInfo] = {
    "vanilla": MethodInfo("Radford et al., ICML 2021 (CLIP)", "nothing: CLIP's own patch tokens"),
    "maskclip": MethodInfo(
        "Zhou et al., ECCV 2022 (MaskCLIP)", "attention → identity (value path); residual and FFN kept",
        Protocol(short_side=512, window=(0, 0)),
    ),
    "sclip": MethodInfo(
        "Wang et al., ECCV 2024 (SCLIP)", "softmax(qqᵀs) + softmax(kkᵀs); residual and FFN kept"
    ),
    "clearclip": MethodInfo(
        "Lan et al., ECCV 2024 (ClearCLIP)", "softmax(qqᵀs); residual and FFN removed",
        Protocol(short_side=448, window=(448, 224), logit_scale=50.0),
    ),
    "naclip": MethodInfo(
        "Hajimiri et al., WACV 2025 (NACLIP)", "softmax(kkᵀs + Gaussian(σ=5)); residual and FFN removed",
        Protocol(pamr=True),
    ),
    "cliptrase": MethodInfo(
        "Shao et al., ECCV 2024 (CLIPtrase)",
        "softmax(qqᵀs) + softmax(kkᵀs) + softmax(vvᵀs); residual and FFN kept",
        Protocol(short_side=224, window=(0, 0), logit_scale=100.0, cluster=True),
    ),
    "itaclip": MethodInfo(
        "Aydın et al., CVPRW 2025 (ITACLIP)",
        "½ SCLIP map + ½ mean of blocks 7, 8, 10; residual kept, FFN removed",
        Protocol(window=(224, 28), pamr=True, image_engineering=True, close_labels=True),
        capture=(6, 7, 9),
    ),
    "proxyclip": MethodInfo(
        "Lan et al., ECCV 2024 (ProxyCLIP)",
        "attention from a VFM's patch similarity on the VFM's grid; residual, FFN and class token removed",
        Protocol(short_side=336, window=(336, 112), pad_multiple=56),
        needs=("vfm",),
    ),
}
