"""CLIPSeg: segment by words or by an example image, on the shared frozen CLIP backbone.

Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts", CVPR 2022. Official code:
timojl/clipseg ``models/clipseg.py`` (``CLIPDensePredT``: ``visual_forward``, ``forward``,
``compute_conditional``) and ``evaluation_utils.py`` / ``datasets/utils.py`` (the visual prompt
engineering, ``img_preprocess`` with ``blend_image_segmentation(mode="crop_blur_highlight352")``).
Hugging Face transformers re-implements it as ``CLIPSegForImageSegmentation``
(``models/clipseg/modeling_clipseg.py``, checkpoints ``CIDAS/clipseg-rd64-refined`` and friends);
``tests/test_clipseg.py`` shows this module equal to it on shared random weights.

For an image ``I`` (resized to ``S × S``, S = 352, normalised with ImageNet's mean and std — not
CLIP's: the official datasets and transformers' processor both do so) and a prompt vector ``c``:

1. Taps: the frozen ViT's tokens ``F_3, F_6, F_9`` after blocks 3, 6, 9 (0-indexed; no final
   norm: transformers' ``hidden_states[i + 1]``), position embeddings resized bicubically to the
   exact grid (``runner.resize_pos_embed``, the rule of the official ``rescaled_pos_emb`` and of
   transformers' ``interpolate_pos_encoding``). Other depths scale the taps: ``⌊i·L/12⌋``.
2. Decoder, deepest tap first: ``a = R₀(F_9)``; FiLM ``a = W_mul(c) ⊙ a + W_add(c)`` (class token
   included); ``a = T₀(a)``; ``a = T₁(R₁(F_6) + a)``; ``a = T₂(R₂(F_3) + a)`` — ``R`` linear
   reductions width → D (D = 64 for rd64), ``T`` post-LN transformer blocks (4 heads, ReLU FFN
   2048: ``nn.TransformerEncoderLayer``'s defaults in the official code).
3. The class token dropped, the grid ``[D, h, w]`` through the plain head (one transposed conv,
   kernel = stride = patch) or the refined one (3×3 conv, ReLU, transposed conv patch/4, ReLU,
   transposed conv patch/4): logits ``[S, S]``, then resized to the image (bilinear).

The prompt vector is unnormalised: the text tower's projected end-of-text token of the prompt as
written (``compute_conditional``: no template at inference), or an image prompt's projected class
token after the official visual prompt engineering (``prompt_image``). N prompts on one image run
the backbone once and the decoder once up to the FiLM, then N times (batched).

Departures: the taps and FiLM layer follow the released weights and transformers (blocks 3, 6,
9; the official training yamls list 3, 7, 9, but ``CLIPDensePredT``'s default and every released
checkpoint use 3, 6, 9). A class with synonyms scores the max over its words; classes compete
by their sigmoid probability (``labels`` = argmax).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.clip import ASSETS, TOY_NAME, ClipBackbone
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary, fill, resolve_templates
from ovdense.backbone.runner import embed, run_blocks
from ovdense.errors import OvdenseError
from ovdense.heads.head_files import read_head, write_head
from ovdense.heads.training_free import SegmentationResult
from ovdense.io import ImageInput, load_image, write_image, write_json, write_label_png, write_probability_png

HEAD_FORMAT = "ovdense-clipseg-head-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_TAPS = (3, 6, 9)  # of ViT-B/16's 12 blocks
TOY_HEAD_FILE = "clipseg-toy-head.safetensors"


@dataclass(frozen=True)
class ClipSegConfig:
    """The decoder's shape and its input protocol.

    Attributes:
        taps: blocks (0-indexed) whose tokens the decoder reads; ``()`` = ``⌊i·L/12⌋`` for
            i in 3, 6, 9 (3, 6, 9 for 12 blocks).
        reduce_dim: D (64: rd64 and rd64-refined; 16: rd16).
        heads, mlp: the decoder blocks' attention heads and FFN width.
        cond_layer: the decoder step (0 = deepest) whose input the FiLM modulates.
        refined: the refined head (``complex_trans_conv``) instead of one transposed conv.
        image_size: S, the square input side; 0 = 352, or the backbone's own ``short_side``.
        normalisation: ``"imagenet"`` (official) or ``"clip"`` (the backbone's own statistics).
    """

    taps: tuple[int, ...] = ()
    reduce_dim: int = 64
    heads: int = 4
    mlp: int = 2048
    cond_layer: int = 0
    refined: bool = False
    image_size: int = 0
    normalisation: str = "imagenet"

    def resolve(self, backbone: ClipBackbone) -> ClipSegConfig:
        """Fill the defaults that depend on the backbone and check the rest."""
        L = backbone.num_layers
        taps = self.taps or tuple(int(i * L / 12) for i in OFFICIAL_TAPS)
        size = self.image_size or int(backbone.defaults.get("short_side", 352))
        out = replace(self, taps=tuple(int(t) for t in taps), image_size=size)
        if sorted(set(out.taps)) != list(out.taps) or not 0 <= out.taps[0] <= out.taps[-1] < L:
            raise OvdenseError(f"CLIPSeg taps must be increasing block indices below {L}, got {out.taps}")
        if not 0 <= out.cond_layer < len(out.taps):
            raise OvdenseError(f"cond_layer must be in [0, {len(out.taps)}), got {out.cond_layer}")
        if out.image_size % backbone.patch_size:
            raise OvdenseError(f"image_size {out.image_size} is not a multiple of the patch "
                               f"size {backbone.patch_size}")
        if out.refined and backbone.patch_size % 4:
            raise OvdenseError(f"the refined head needs a patch size divisible by 4, got "
                               f"{backbone.patch_size}")
        if out.normalisation not in ("imagenet", "clip"):
            raise OvdenseError(f"normalisation must be 'imagenet' or 'clip', got {out.normalisation!r}")
        if out.reduce_dim % out.heads:
            raise OvdenseError(f"reduce_dim {out.reduce_dim} is not divisible by heads {out.heads}")
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClipSegConfig:
        data = json.loads(text)
        data["taps"] = tuple(data.get("taps", ()))
        return cls(**data)


class DecoderBlock(nn.Module):
    """``nn.TransformerEncoderLayer(d_model, nhead)`` of the official decoder, post-LN, ReLU,
    batch first, no dropout: ``x = LN₁(x + MHA(x)); x = LN₂(x + W₂ relu(W₁ x))``. The parameter
    names are the official ones (``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``)."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.linear1 = nn.Linear(width, hidden)
        self.linear2 = nn.Linear(hidden, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, N, D
        x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class ClipSegHead(nn.Module):
    """What CLIPSeg trains (1.1 M parameters for B/16 rd64): FiLM, reductions, decoder blocks and
    the transposed-convolution head. The backbone stays the caller's and never enters the state
    dict; ``forward`` takes it as an argument."""

    def __init__(self, backbone: ClipBackbone, config: ClipSegConfig | None = None):
        super().__init__()
        self.config = (config or ClipSegConfig()).resolve(backbone)
        c = self.config
        D, p = c.reduce_dim, backbone.patch_size
        self.patch_size = p
        self.film_mul = nn.Linear(backbone.embed_dim, D)
        self.film_add = nn.Linear(backbone.embed_dim, D)
        self.reduces = nn.ModuleList(nn.Linear(backbone.width, D) for _ in c.taps)
        self.blocks = nn.ModuleList(DecoderBlock(D, c.heads, c.mlp) for _ in c.taps)
        if c.refined:
            k = p // 4
            self.trans_conv = nn.Sequential(
                nn.Conv2d(D, D, kernel_size=3, padding=1), nn.ReLU(),
                nn.ConvTranspose2d(D, D // 2, kernel_size=k, stride=k), nn.ReLU(),
                nn.ConvTranspose2d(D // 2, 1, kernel_size=k, stride=k),
            )
        else:
            self.trans_conv = nn.ConvTranspose2d(D, 1, kernel_size=p, stride=p)

    # ----------------------------------------------------------------------------------------
    # The backbone's side

    def normalise(self, backbone: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` → normalised by the config's statistics."""
        if self.config.normalisation == "clip":
            return backbone.normalize(images)
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (images - mean) / std

    def taps(self, backbone: ClipBackbone, images: torch.Tensor) -> list[torch.Tensor]:
        """The tokens after the tap blocks, shallowest first: each ``[B, 1 + h·w, W]``."""
        visual = backbone.model.visual
        x = embed(visual, images, resize="size")  # B, 1+hw, W
        _, out = run_blocks(visual, x, 0, self.config.taps[-1] + 1, taps=self.config.taps)
        return [out[t] for t in self.config.taps]

    def image_prompt_vectors(self, backbone: ClipBackbone, images: torch.Tensor) -> torch.Tensor:
        """Prompt vectors ``[B, D_joint]`` of prompt images (already engineered and normalised):
        the projected class token, unnormalised (the official ``visual_forward``'s first output)."""
        visual = backbone.model.visual
        x = embed(visual, images, resize="size")  # B, 1+hw, W
        x, _ = run_blocks(visual, x, 0, backbone.num_layers)
        cls = visual.ln_post(x[:, 0])  # B, W
        return cls @ visual.proj if visual.proj is not None else cls  # B, D_joint

    # ----------------------------------------------------------------------------------------
    # The decoder

    def forward(self, taps: Sequence[torch.Tensor], cond: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """Logits ``[P, S', S']`` for ``P`` prompt vectors ``cond [P, D_joint]`` on one image's taps
        (each ``[1, 1 + h·w, W]``), or on ``P`` images' taps (each ``[P, 1 + h·w, W]``).

        The decoder runs once up to the FiLM and ``P`` times after it, batched.
        """
        h, w = grid
        a = None
        for i, (tap, block, reduce) in enumerate(zip(reversed(taps), self.blocks, self.reduces)):
            r = reduce(tap)  # 1|P, N, D
            a = r if a is None else r + a
            if i == self.config.cond_layer:
                a = self.film_mul(cond)[:, None] * a + self.film_add(cond)[:, None]  # P, N, D
            a = block(a)
        a = a[:, 1:].transpose(1, 2).reshape(a.shape[0], -1, h, w)  # P, D, h, w
        return self.trans_conv(a)[:, 0]  # P, S', S'


# --------------------------------------------------------------------------------------------
# The visual prompt


def prompt_image(rgb: np.ndarray, mask: np.ndarray, size: int = 352, context: float = 0.1, blur: float = 3.0,
                 background: float = 0.1, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """The official visual prompt engineering (``crop_blur_highlight352``): ``[1, 3, size, size]``.

    As the official data path does it: the image resized to ``size × size`` (bilinear,
    ``align_corners=True``; the mask nearest) and normalised, then ``engineer_prompt``.

    Args:
        rgb: ``uint8 [H, W, 3]``.
        mask: ``[H, W]``, non-zero on the object.
    Raises:
        OvdenseError: the mask is empty or does not match the image.
    """
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise OvdenseError(f"the prompt mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                           f"{rgb.shape[1]}x{rgb.shape[0]}: give a mask of the image's size")
    img = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()  # 1, 3, H, W
    img = F.interpolate(img, (size, size), mode="bilinear", align_corners=True)[0] / 255.0  # 3, S, S
    seg = torch.from_numpy((mask != 0).astype(np.uint8))[None, None]  # 1, 1, H, W
    seg = F.interpolate(seg, (size, size), mode="nearest")[0, 0]  # S, S
    img = (img - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return engineer_prompt(img, seg, context, blur, background)[None]


def engineer_prompt(img: torch.Tensor, seg: torch.Tensor, context: float = 0.1, blur: float = 3.0,
                    background: float = 0.1) -> torch.Tensor:
    """``img_preprocess`` of the official ``evaluation_utils.py`` on a normalised image ``[3, S, S]``
    and its mask ``[S, S]``: the background blurred (``cv2.GaussianBlur``, kernel 15, σ = ``blur``)
    and dimmed to ``background``: ``img·m + background·blur(img)·(1 − m)``; cropped to the mask's
    box grown by ``context`` of its extent on each side (``crop_mask``), zero-padded to a square,
    centred (``pad_to_square``), resized back to ``S`` (nearest, torch's default there).
    Returns ``[3, S, S]`` on ``img``'s device.

    Raises:
        OvdenseError: the mask is empty.
    """
    size = img.shape[-1]
    device = img.device
    img = img.detach().float().cpu()
    seg = (seg.detach().cpu() != 0).float()  # S, S
    if not seg.any():
        raise OvdenseError("the prompt mask is empty (at the prompt's input size): mark the object")
    blurred = cv2.GaussianBlur(img.permute(1, 2, 0).numpy(), (15, 15), blur)  # S, S, 3
    blurred = torch.from_numpy(blurred).permute(2, 0, 1)  # 3, S, S
    img = img * seg + background * blurred * (1 - seg)  # 3, S, S
    rows, cols = np.nonzero(seg.numpy())
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    dr, dc = r1 - r0, c1 - c0
    r0, r1 = int(max(0, r0 - context * dr)), int(min(size, r1 + context * dr))
    c0, c1 = int(max(0, c0 - context * dc)), int(min(size, c1 + context * dc))
    crop = img[:, r0:r1, c0:c1]  # 3, h, w
    h, w = crop.shape[1:]
    top = left = bottom = right = 0
    if h > w:
        left = (h - w) // 2
        right = h - w - left
    elif w > h:
        top = (w - h) // 2
        bottom = w - h - top
    crop = F.pad(crop, (left, right, top, bottom))  # 3, s, s (zeros: the mean colour)
    return F.interpolate(crop[None], (size, size), mode="nearest")[0].to(device)  # 3, S, S


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_head(path: str | Path, head: ClipSegHead, backbone: ClipBackbone,
              dtype: torch.dtype | None = None) -> Path:
    """Write the head as safetensors (atomically) with its format, backbone name and identity,
    config and the ovdense version (``head_files.write_head``); ``dtype`` stores the floating
    tensors in that type."""
    return write_head(path, head, backbone, HEAD_FORMAT, dtype)


def load_head(path: str | Path, backbone: ClipBackbone) -> ClipSegHead:
    """Read a head written by ``save_head`` for this backbone (never unpickles anything).

    Raises:
        OvdenseError: not a CLIPSeg head, another backbone, or keys and shapes that do not fit.
    """
    return read_head(path, backbone, HEAD_FORMAT, "CLIPSeg",
                     lambda config: ClipSegHead(backbone, ClipSegConfig.from_json(config)),
                     "tools/model_converters/clipseg2ovdense.py", "ovdense.heads.clipseg.save_head")


def default_head_checkpoint(backbone: ClipBackbone) -> Path:
    """The head that ships for ``backbone``: only the toy model may have one."""
    path = ASSETS / TOY_HEAD_FILE
    if backbone.name == TOY_NAME and path.is_file():
        return path
    raise OvdenseError(
        f"CLIPSeg needs a trained head for {backbone.name}: pass head_checkpoint=PATH (CLI "
        "--head-checkpoint); convert the published weights (CIDAS/clipseg-rd64-refined, or the "
        "official rd64-uni.pth) with tools/model_converters/clipseg2ovdense.py")


# --------------------------------------------------------------------------------------------
# Inference


@dataclass
class ClipSegResult(SegmentationResult):
    """A CLIPSeg segmentation, with each class's probability map ``probabilities [C, H, W]``
    (each an independent sigmoid; a class's map is the max over its prompts)."""

    probabilities: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))

    OUTPUTS = ("_labels.png", "_overlay.jpg", "_prob_0.png", ".json")

    def save(self, out_dir: str | os.PathLike, stem: str, image: ImageInput, /, **info) -> list[Path]:
        """``SegmentationResult``'s files and ``<stem>_prob_<k>.png`` for each class ``k``
        (``ovdense.io.write_probability_png``: 16-bit, ``p = value / 65535``), named in the JSON
        (each class's ``probability_map``), which is written last."""
        out = Path(out_dir)
        written = [write_label_png(out / f"{stem}_labels.png", self.labels),
                   write_image(out / f"{stem}_overlay.jpg", self.overlay(image))]
        written += [write_probability_png(out / f"{stem}_prob_{k}.png", p)
                    for k, p in enumerate(self.probabilities)]
        report = self.to_json(**info)
        for entry, path in zip(report["classes"], written[2:]):
            entry["probability_map"] = path.name
        return written + [write_json(out / f"{stem}.json", report)]


class ClipSegSegmenter:
    """Segment images by words (and example images) with a CLIPSeg head (the shape of ``Segmenter``).

    Protocol (the official Quickstart: ``ToTensor``, ``Normalize``, ``Resize((352, 352))`` on the
    tensor — bilinear with antialiasing, torchvision's default): the image resized to ``S × S``,
    normalised, one backbone pass; each prompt's logits at ``S × S`` resized to the
    image (bilinear) and passed through the sigmoid; a class's probability is the max over its
    prompts; ``labels`` = the most probable class (class 0 where none reaches ``bg_threshold``),
    ``scores`` the most probable class's probability.

    Args:
        backbone: the shared backbone the head was trained on.
        classes: class names; a string with commas (or a list) gives synonyms.
        head_checkpoint: a file written by ``save_head``; or pass ``head``; neither: the head
            that ships for this backbone.
        head: a ``ClipSegHead`` in memory.
        templates: how a word becomes a prompt: ``None`` = the word as written (the official
            inference), or the backbone's own templates (the toy model); a set's name or a list
            (``ovdense.backbone.prompts``): with several, a word's prompt vector is the mean of its
            templates' unnormalised embeddings (an ovdense addition; one template is the official
            use).
        short_side: the square input side S; ``None`` = the head's own (its config's
            ``image_size``: 352 for the published heads).
        bg_threshold: pixels whose most probable class has a probability below it go to class 0
            (name a background class first); each prompt's map is an independent sigmoid, so
            without it every pixel gets some class. ``None``: plain argmax.
        image_prompts: ``{class name: (rgb, mask)}``, classes prompted by an example image.
    """

    method = "clipseg"

    def __init__(
        self,
        backbone: ClipBackbone,
        classes: Sequence[ClassSpec] | Vocabulary = (),
        head_checkpoint: str | Path | None = None,
        head: ClipSegHead | None = None,
        templates: Templates | None = None,
        short_side: int | None = None,
        bg_threshold: float | None = 0.5,
        image_prompts: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        if head is not None and head_checkpoint is not None:
            raise OvdenseError("CLIPSeg takes one trained head: pass head_checkpoint=PATH or head=, not both")
        if head is None and head_checkpoint is None:
            head_checkpoint = default_head_checkpoint(backbone)
        self.backbone = backbone
        self.head = load_head(head_checkpoint, backbone) if head is None else head
        self.head.eval()
        self.head_checkpoint = str(head_checkpoint) if head_checkpoint is not None else None
        own = backbone.defaults.get("templates")
        self.templates = resolve_templates(templates if templates is not None else (own or "{}"))
        self.input_size = int(short_side) if short_side else self.head.config.image_size
        if bg_threshold is not None and not 0 <= bg_threshold <= 1:
            raise OvdenseError(f"bg_threshold must be in [0, 1], got {bg_threshold}")
        self.bg_threshold = bg_threshold
        if self.input_size % backbone.patch_size:
            raise OvdenseError(f"short_side {self.input_size} is not a multiple of the patch size "
                               f"{backbone.patch_size}")
        image_prompts = dict(image_prompts or {})
        if isinstance(classes, Vocabulary):
            words = classes
        elif image_prompts and not len(classes):
            words = Vocabulary((), (), ())
        else:
            words = Vocabulary.parse(classes)
        self.vocabulary = Vocabulary(words.names + tuple(image_prompts),
                                     words.prompts, words.class_of_prompt)
        if not len(self.vocabulary):
            raise OvdenseError("CLIPSeg needs at least one class or image prompt")
        with torch.inference_mode():
            vectors = [self.text_prompts(words.prompts)] if words.prompts else []
            vectors += [self.image_prompt(rgb, mask) for rgb, mask in image_prompts.values()]
        self.cond = torch.cat(vectors).float()  # P, D_joint
        self.synonyms = tuple(words.synonyms()) + tuple((name,) for name in image_prompts)
        first = len(words.names)
        self.class_of_prompt = torch.tensor(
            list(words.class_of_prompt) + [first + i for i in range(len(image_prompts))],
            device=backbone.device)

    @torch.inference_mode()
    def text_prompts(self, words: Sequence[str]) -> torch.Tensor:
        """Prompt vectors ``[W, D_joint]`` of words: each word in every template, the unnormalised
        embeddings averaged over the templates (one template: its embedding as it is)."""
        T = len(self.templates)
        vectors = text_prompt_vectors(self.backbone, [fill(t, w) for w in words for t in self.templates])
        return vectors.view(len(words), T, -1).mean(dim=1)  # W, D_joint

    @torch.inference_mode()
    def image_prompt(self, rgb: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """The prompt vector ``[1, D_joint]`` of an example: ``rgb`` ``uint8 [H, W, 3]`` and the
        object's ``mask`` ``[H, W]`` through ``prompt_image`` at the head's input size."""
        clip_stats = self.head.config.normalisation == "clip"
        mean = self.backbone.mean if clip_stats else IMAGENET_MEAN
        std = self.backbone.std if clip_stats else IMAGENET_STD
        engineered = prompt_image(rgb, mask, self.input_size, mean=mean, std=std)
        x = engineered.to(self.backbone.device, self.backbone.dtype)
        return self.head.image_prompt_vectors(self.backbone, x).float()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.vocabulary.names

    def settings(self) -> dict:
        """Every setting that shapes the output (written into the CLI's JSON)."""
        return {"method": self.method, "head_checkpoint": self.head_checkpoint,
                "templates": list(self.templates), "short_side": self.input_size,
                "bg_threshold": self.bg_threshold,
                "clipseg_config": json.loads(self.head.config.to_json())}

    @torch.inference_mode()
    def prompt_logits(self, rgb: np.ndarray, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[P, S, S]`` of every prompt at the input size (before resizing to the image);
        ``cond`` ``[P, D_joint]``: other prompt vectors than the segmenter's own."""
        S = self.input_size
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()  # 1, 3, H, W
        x = F.interpolate(x.to(self.backbone.device) / 255.0, (S, S), mode="bilinear", align_corners=False,
                          antialias=True)  # 1, 3, S, S
        x = self.head.normalise(self.backbone, x).to(self.backbone.dtype)
        taps = self.head.taps(self.backbone, x)
        g = S // self.backbone.patch_size
        cond = self.cond if cond is None else cond
        logits = self.head(taps, cond.to(taps[0].dtype), (g, g)).float()  # P, S', S'
        if logits.shape[-1] != S:
            logits = F.interpolate(logits[None], (S, S), mode="bilinear", align_corners=False)[0]
        return logits

    @torch.inference_mode()
    def probabilities(self, rgb: np.ndarray) -> torch.Tensor:
        """Class probabilities ``[C, H, W]`` at the image's resolution (max over each class's prompts)."""
        logits = self.prompt_logits(rgb)  # P, S, S
        logits = F.interpolate(logits[None], rgb.shape[:2], mode="bilinear",
                               align_corners=False)[0]  # P, H, W
        probs = logits.sigmoid()
        C = len(self.vocabulary)
        if probs.shape[0] == C and bool((self.class_of_prompt == torch.arange(C, device=probs.device)).all()):
            return probs
        index = self.class_of_prompt.view(-1, 1, 1).expand_as(probs)
        return probs.new_full((C,) + probs.shape[1:], -1.0).scatter_reduce(0, index, probs, reduce="amax")

    @torch.inference_mode()
    def predict(self, image: ImageInput) -> SegmentationResult:
        """Segment one image (path, PIL image or RGB array) at its own resolution."""
        rgb = load_image(image)
        probs = self.probabilities(rgb)  # C, H, W
        best, labels = probs.max(dim=0)
        if self.bg_threshold is not None:
            labels[best < self.bg_threshold] = 0
        return ClipSegResult(labels.cpu().numpy(), best.float().cpu().numpy(), self.classes, self.synonyms,
                             self.settings(), probabilities=probs.float().cpu().numpy())


def text_prompt_vectors(backbone: ClipBackbone, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt vectors ``[P, D_joint]`` of text: the projected end-of-text token, unnormalised
    (the official ``compute_conditional``: ``clip_model.encode_text(clip.tokenize(prompts))``)."""
    tokens = backbone.tokenizer(list(prompts)).to(backbone.device)  # P, N
    return backbone.model.encode_text(tokens, normalize=False).float()
