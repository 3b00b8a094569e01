"""A second vision model beside CLIP (a VFM): the patch features that tell CLIP which patches belong
together (ProxyCLIP, CLIP-DINOiser's training).

One small contract, ``VisionModel.features(rgb) → [B, C, h, w]``: ``rgb`` is ``[B, 3, H, W]`` in
``[0, 1]``; each model applies its own normalisation (ImageNet statistics for all of these) and its
own position-embedding rule, and says its grid (``grid(H, W)``). Built offline:

- ``dino_vitb8`` / ``dino_vitb16``: DINO ViT-B/8 and B/16 (Caron et al., ICCV 2021), official files
  ``dino_vitbase8_pretrain.pth`` / ``dino_vitbase16_pretrain.pth``, built as timm's
  ``vit_base_patch8_224`` / ``vit_base_patch16_224`` (the same keys), DINO's position rule;
- ``dino_vits8``: DINO ViT-S/8, official file ``dino_deitsmall8_300ep_pretrain.pth`` (the one FOUND,
  CLIP-DINOiser's background teacher, loads; ``dino_deitsmall8_pretrain.pth`` has the same keys), built
  as timm's ``vit_small_patch8_224``;
- ``dinov2_vitb14_reg``: DINOv2 ViT-B/14 with 4 registers (Darcet et al., ICLR 2024), official file
  ``dinov2_vitb14_reg4_pretrain.pth``, built as timm's ``vit_base_patch14_reg4_dinov2`` (timm's key
  map), DINOv2's position rule (which is timm's);
- ``sam_vit_b``: SAM's ViT-B image encoder (Kirillov et al., ICCV 2023), official file
  ``sam_vit_b_01ec64.pth``, built by segment-anything; a fixed 64 × 64 grid (input resized to 1024²).

DINO's features are ``get_intermediate_layers(x)[0]`` of the official
``facebookresearch/dino`` ``vision_transformer.py`` (the last block, final LayerNorm, the class token
dropped), with its ``interpolate_pos_encoding`` (bicubic, ``scale_factor = (n + 0.1) / 28``;
``dense.interpolate_pos_embed``); timm's own resize (``dynamic_img_size``, antialiased) is not DINO's,
so ovdense runs timm's layers with DINO's rule. DINOv2's are ``get_intermediate_layers(x, reshape=True)``
of ``facebookresearch/dinov2`` (final norm, class and register tokens dropped); timm's dynamic resize
(fp32, bicubic, antialias, no offset) is that model's own. SAM's are its image encoder's neck output
for the image resized (bilinear) to 1024 × 1024, as ProxyCLIP's ``proxyclip_segmentor.py`` takes them.
``tests/test_vfm.py`` checks each against its official code on random weights. ``last_block_qkv(rgb, kind)``
gives DINO's last-block query, key or value tokens instead (the output of ``blocks[-1].attn.qkv``, heads
concatenated), as FOUND's and CLIP-DINOiser's forward hooks take them.

Weights: ``weights=PATH`` loads the official file (``torch.load(weights_only=True)`` or safetensors;
DINOv2's through timm's key map); ``weights="random"`` builds random weights (tests); ``None`` is an
error naming the file and where to get it, since nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.dense import interpolate_pos_embed
from ovdense.errors import OvdenseError, checkpoint_error_text
from ovdense.io import read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VfmSpec:
    """What a VFM name builds: its family, the timm model (or SAM's builder), patch size, feature
    width, the official weights file and its address."""

    family: str  # "dino", "dinov2" or "sam"
    arch: str
    patch_size: int
    width: int
    weights_file: str
    url: str


VFMS: dict[str, VfmSpec] = {
    "dino_vitb8": VfmSpec("dino", "vit_base_patch8_224", 8, 768, "dino_vitbase8_pretrain.pth",
                          "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_vitb16": VfmSpec("dino", "vit_base_patch16_224", 16, 768, "dino_vitbase16_pretrain.pth",
                           "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
                           "dino_vitbase16_pretrain.pth"),
    "dino_vits8": VfmSpec("dino", "vit_small_patch8_224", 8, 384, "dino_deitsmall8_300ep_pretrain.pth",
                          "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                          "dino_deitsmall8_300ep_pretrain.pth"),
    "dinov2_vitb14_reg": VfmSpec("dinov2", "vit_base_patch14_reg4_dinov2", 14, 768,
                                 "dinov2_vitb14_reg4_pretrain.pth",
                                 "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/"
                                 "dinov2_vitb14_reg4_pretrain.pth"),
    "sam_vit_b": VfmSpec("sam", "vit_b", 16, 256, "sam_vit_b_01ec64.pth",
                         "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
}
SAM_INPUT = 1024


class VisionModel(nn.Module):
    """A frozen VFM: ``features(rgb [B, 3, H, W] in [0, 1]) → [B, width, h, w]`` on ``grid(H, W)``.

    Attributes:
        name: the ``VFMS`` key.
        spec: its ``VfmSpec``.
        model: the timm ViT (DINO, DINOv2) or SAM's ``ImageEncoderViT``.
        weights: the weights file, or ``"random"``.
    """

    def __init__(self, name: str, model: nn.Module, weights: str):
        super().__init__()
        self.name, self.spec, self.model, self.weights = name, VFMS[name], model.eval(), weights
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def width(self) -> int:
        return self.spec.width

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The feature grid for an ``height × width`` input (SAM: always 64 × 64)."""
        if self.spec.family == "sam":
            return SAM_INPUT // self.patch_size, SAM_INPUT // self.patch_size
        return height // self.patch_size, width // self.patch_size

    def normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` RGB → ImageNet-normalised, in the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return ((rgb.to(self.mean.dtype) - self.mean) / self.std).to(dtype)

    @torch.no_grad()
    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        self._check(rgb)
        x = self.normalise(rgb)
        return {"dino": self._dino, "dinov2": self._dinov2, "sam": self._sam}[self.spec.family](x)

    @torch.no_grad()
    def last_block_qkv(self, rgb: torch.Tensor, kind: str) -> torch.Tensor:
        """DINO's last-block ``kind`` tokens (``"q"``, ``"k"`` or ``"v"``): the output of
        ``blocks[-1].attn.qkv`` (on ``norm1`` of the block's input, with its bias) split in three,
        the heads concatenated, the class token dropped, not normalised: ``[B, width, h, w]``.
        This is what a forward hook on that layer gives FOUND (``model.py: extract_feats``, ``"k"``)
        and CLIP-DINOiser (``clip_dinoiser.py: extract_feats``, ``"v"``)."""
        if self.spec.family != "dino":
            raise OvdenseError(f"{self.name}: last-block q/k/v tokens are for the DINO models "
                               f"({', '.join(n for n, s in VFMS.items() if s.family == 'dino')})")
        if kind not in ("q", "k", "v"):
            raise OvdenseError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
        self._check(rgb)
        tokens, (h, w) = self._dino_tokens(self.normalise(rgb))  # B, 1+hw, C
        last = self.model.blocks[-1]
        tokens = self.model.blocks[:-1](tokens)
        qkv = last.attn.qkv(last.norm1(tokens))  # B, 1+hw, 3C: (3, heads, head width) in that order
        C = qkv.shape[-1] // 3
        part = qkv[:, 1:, "qkv".index(kind) * C:("qkv".index(kind) + 1) * C]  # B, hw, C
        return part.float().transpose(1, 2).reshape(part.shape[0], C, h, w)

    def _check(self, rgb: torch.Tensor) -> None:
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise OvdenseError(f"{self.name}: expected RGB images [B, 3, H, W], got {tuple(rgb.shape)}")
        H, W = rgb.shape[-2:]
        if min(H, W) < self.patch_size:
            raise OvdenseError(f"{self.name}: the image ({H}x{W}) is smaller than one "
                               f"{self.patch_size} px patch")

    def _dino_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """DINO's ``prepare_tokens`` on timm's layers: ``[B, 1+hw, C]`` and the grid ``(h, w)``."""
        vit = self.model
        tokens = vit.patch_embed.proj(x)  # B, C, h, w (the conv floors a partial last patch away)
        B, C, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)  # B, hw, C
        native = int(round((vit.pos_embed.shape[1] - 1) ** 0.5))
        pos = interpolate_pos_embed(vit.pos_embed[0], (native, native), (h, w))  # 1+hw, C
        tokens = torch.cat([vit.cls_token.expand(B, -1, -1), tokens], dim=1) + pos.unsqueeze(0)
        return tokens, (h, w)

    def _dino(self, x: torch.Tensor) -> torch.Tensor:
        """DINO's ``prepare_tokens`` → blocks → ``norm`` on timm's layers; patch tokens on the grid."""
        tokens, (h, w) = self._dino_tokens(x)
        tokens = self.model.norm(self.model.blocks(tokens))
        B, _, C = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(B, C, h, w)

    def _dinov2(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.model
        H, W = x.shape[-2:]
        h, w = H // self.patch_size, W // self.patch_size
        x = x[..., : h * self.patch_size, : w * self.patch_size]
        tokens = vit.forward_features(x)  # B, 1 + registers + hw, C (final norm applied)
        patches = tokens[:, vit.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def _sam(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(SAM_INPUT, SAM_INPUT), mode="bilinear", align_corners=False)
        return self.model(x)  # B, 256, 64, 64


def _build(spec: VfmSpec) -> nn.Module:
    if spec.family == "sam":
        from segment_anything.build_sam import sam_model_registry

        return sam_model_registry[spec.arch](checkpoint=None).image_encoder
    import timm

    kwargs = dict(pretrained=False, num_classes=0)
    if spec.family == "dinov2":
        kwargs.update(dynamic_img_size=True, img_size=518, init_values=1e-5)
    return timm.create_model(spec.arch, **kwargs)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = read_weights(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's wrong weights
        raise OvdenseError(f"{path} is not a readable weights file ({checkpoint_error_text(e)}); ovdense "
                           "reads tensors only (the official .pth, or .safetensors)") from e
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):  # DINO's full training checkpoint
        state = {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OvdenseError(f"{path} holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _official_to_built(spec: VfmSpec, state: dict, model: nn.Module) -> dict:
    """The official file's keys → the built model's: DINO's are timm's as they are; DINOv2's go
    through timm's ``checkpoint_filter_fn`` (``mask_token`` dropped, ``register_tokens`` →
    ``reg_token``, the class position folded into the class token); SAM's ``image_encoder.*``."""
    if spec.family == "dinov2":
        from timm.models.vision_transformer import checkpoint_filter_fn

        if "register_tokens" in state or "mask_token" in state:
            state = checkpoint_filter_fn(state, model)
    elif spec.family == "sam":
        prefix = "image_encoder."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_vfm_weights(name: str, model: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load the official weights file of ``name`` into the built ``model``."""
    spec = VFMS[name]
    file = Path(path)
    if not file.is_file():
        raise OvdenseError(f"{name}: weights file not found: {file} (the official {spec.weights_file})")
    state = _official_to_built(spec, _read_state(file), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, {name} expects "
                  f"{tuple(expected[wrong[0]].shape)}" if wrong else
                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise OvdenseError(f"{file} is not {name}'s weights ({detail}); {name} reads the official "
                           f"{spec.weights_file}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def create_vfm(name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
               ) -> VisionModel:
    """Build the VFM ``name`` (``VFMS``) with ``weights`` (the official file's path, or ``"random"``).

    Raises:
        OvdenseError: an unknown name; no weights given (naming the file and its address); a
            file that is missing, unreadable, or another model's.
    """
    if name not in VFMS:
        raise OvdenseError(f"unknown vision model {name!r}; known: {', '.join(VFMS)}")
    spec = VFMS[name]
    if weights is None:
        raise OvdenseError(f"{name} needs its weights: download {spec.weights_file} ({spec.url}) where there "
                           f"is a network and pass its path (CLI --vfm-weights PATH); nothing is downloaded "
                           f"here ('random', CLI --vfm-weights none: random weights, for tests)")
    model = _build(spec)
    if str(weights).lower() != "random":
        load_vfm_weights(name, model, weights)
        weights = str(weights)
    else:
        weights = "random"
    return VisionModel(name, model, weights).to(device)
