"""CLIPSelf: a CLIP ViT distils the class-token embedding of image crops into its own dense features.

Wu et al., "CLIPSelf: Vision Transformer Distills Itself for Open-Vocabulary Dense Prediction",
ICLR 2024 (§3.2, Fig. 2); official code wusize/CLIPSelf, a fork of open_clip. Its OpenAI-ViT path is
followed here, file by file:

* **student** (``student_dense``, ``student_region_features``): ``src/open_clip/transformer.py``
  ``VisionTransformer._extract_roi_features_v2`` (``--extract-type v2``, the default): the whole
  image, position embeddings resized bicubically to the grid (``rescale_positional_embedding``: to
  the exact size, ``runner.embed(resize="size")``), blocks ``0..L-2`` as they are, the last block as
  MaskCLIP's value path with its residual and MLP kept (``Transformer.extract_feature_map`` →
  ``ResidualAttentionBlockV2.forward_without_attn``, ``dense.maskclip_block``), ``ln_post``, the
  projection, per-token L2. Each region is a 1×1 ``roi_align`` (aligned, adaptive sampling,
  ``spatial_scale = 1``) of that map at its box scaled to the token grid;
* **teacher** (``teacher_features``): a frozen copy of the original weights; its ``encode_image``
  (the class token) of each region's crop;
* **loss** (``clipself_loss``): ``src/training/clipself.py`` ``CLIPSelf.__call__``:
  ``1 − mean_r cos(s_r, t_r)`` over the batch's regions, both sides re-normalised;
* **regions** (``grid_regions``, ``proposal_regions``): ``src/training/data.py``
  ``GridDistillDataset`` ("image patches": one ``M × N`` grid a image from ``grid_choices(6)``'s 24
  choices, at most 20 cells, crops cut from the original image) and ``ProposalDistillDataset``
  ("region proposals": up to 20 boxes of a COCO-format file, the crop enlarged 1.5×, boxes under 8² or
  over 1024² pixels skipped). The image goes to the student through ``det_image_transform``
  (``ResizeLongest``: long side 1024, bicubic, zero pixels bottom-right), each crop to the teacher
  through ``image_transform(resize_longest_max=True)`` (``ResizeMaxSize``: long side 224, centred
  zero pixels), both then normalised with the backbone's mean and std;
* **what trains** (``trainable_parameters``, ``parameter_groups``): ``src/training/main.py`` with
  ``--lock-image --lock-image-unlocked-groups L``: every transformer block; patch embedding, class
  token, position embedding, ``ln_pre``, ``ln_post`` and the projection stay frozen (and the text
  tower). AdamW without weight decay on 1-d tensors, biases and norms (its ``exclude`` rule);
* **what is kept** (``ensemble``): ``src/training/train.py`` ``student_teacher_ensemble``:
  ``α · student + (1 − α) · teacher`` over every tensor (α 0.7 for B/16, 0.95 for L/14 in its scripts).

Where ovdense departs: blocks run through ``dense.run_block`` (SDPA, equal to open_clip's
``nn.MultiheadAttention`` within float32 rounding, gradients included); the teacher's crops run the
same way. The region samplers take their own ``random.Random`` instead of the global ``random``
module, and return only the valid regions (the official dataset pads to 20 with a validity flag).
``tests/test_clipself_official.py`` runs the official code on the same random weights.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone import dense, runner
from ovdense.errors import OvdenseError

#: the official ``--max-split``, ``--max-boxes``, ``--det-image-size``, ``--min-size``, ``--max-size``
MAX_SPLIT, MAX_BOXES, IMAGE_SIZE, MIN_BOX, MAX_BOX = 6, 20, 1024, 8, 1024
#: α of the saved weights in the official scripts (``--alpha``), by tower depth
ALPHA = {12: 0.7, 24: 0.95}


# --------------------------------------------------------------------------------------------
# Regions: grids of image patches, or proposals, with the teacher's crops


def grid_choices(max_split: int = MAX_SPLIT) -> list[tuple[int, int]]:
    """The official ``GridDistillDataset._init_choices``: ``(M, N)`` grids of ``M`` rows and ``N``
    columns, ``M ≤ max_split``, ``⌈M/2⌉ ≤ N ≤ min(2M, max_split)``; 24 choices for 6."""
    return [(m, n) for m in range(1, max_split + 1)
            for n in range((m + 1) // 2, min(m * 2 + 1, max_split + 1))]


def grid_boxes(rows: int, cols: int) -> torch.Tensor:
    """The cells of a ``rows × cols`` grid of ``[0, 1]²`` as ``[rows·cols, 4]`` normalised
    ``(x0, y0, x1, y1)``, row by row (``_init_boxes``)."""
    xs = torch.linspace(0, 1, cols + 1)
    ys = torch.linspace(0, 1, rows + 1)
    x0, y0 = torch.meshgrid(xs[:-1], ys[:-1], indexing="xy")  # rows, cols each
    x1, y1 = torch.meshgrid(xs[1:], ys[1:], indexing="xy")
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


@dataclass
class Regions:
    """One image's training sample: ``image [3, S, S]`` (normalised, long side ``S``, zero pixels
    bottom-right), ``boxes [K, 4]`` normalised to that padded square, ``crops [K, 3, c, c]``."""

    image: torch.Tensor
    boxes: torch.Tensor
    crops: torch.Tensor


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise OvdenseError(f"expected an RGB uint8 image [H, W, 3], got {array.dtype} {list(array.shape)}")
    return Image.fromarray(array)


def _normalise(image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 3, H, W
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_longest(image, size: int, mean: Sequence[float], std: Sequence[float],
                   centre: bool) -> tuple[torch.Tensor, float]:
    """A PIL RGB image, its long side to ``size`` (bicubic, sides rounded), zero pixels to a
    ``size × size`` square — bottom-right (``ResizeLongest``, the student's image) or centred
    (``ResizeMaxSize``, the teacher's crops) — then normalised. Returns ``([3, size, size], scale)``."""
    from PIL import Image

    width, height = image.size
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    pad_w, pad_h = size - new_w, size - new_h
    canvas.paste(resized, (pad_w // 2, pad_h // 2) if centre else (0, 0))
    return _normalise(canvas, mean, std), scale


def _sample(image, boxes: torch.Tensor, crop_boxes: Iterable[Sequence[float]], size: int, crop_size: int,
            mean, std) -> Regions:
    """The student's image, the boxes (original pixels) normalised to its padded square, and the crops."""
    new_image, scale = resize_longest(image, size, mean, std, centre=False)
    crops = [resize_longest(image.crop(tuple(b)), crop_size, mean, std, centre=True)[0] for b in crop_boxes]
    boxes = boxes * scale / size
    return Regions(new_image, boxes, torch.stack(crops) if crops else torch.zeros(0, 3, crop_size, crop_size))


def grid_regions(image, rng: random.Random, mean: Sequence[float], std: Sequence[float],
                 size: int = IMAGE_SIZE, crop_size: int = 224, max_split: int = MAX_SPLIT,
                 max_boxes: int = MAX_BOXES, crop_scale: float = 1.0) -> Regions:
    """"Image patches" (``GridDistillDataset.__getitem__``): one grid drawn from ``grid_choices``,
    its cells shuffled, the first ``max_boxes`` kept; each crop is its cell of the original image
    (widened by ``crop_scale`` about its centre, clipped to the image; the official default 1)."""
    image = _as_pil(image)
    rows, cols = rng.choice(grid_choices(max_split))
    width, height = image.size
    cells = grid_boxes(rows, cols) * torch.tensor([width, height, width, height])  # K, 4 pixels
    order = list(range(len(cells)))
    rng.shuffle(order)
    cells = cells[order[:max_boxes]]
    crop_boxes = []
    for x0, y0, x1, y1 in cells.tolist():
        if crop_scale > 1.0:
            w, h, cx, cy, d = x1 - x0, y1 - y0, (x1 + x0) / 2, (y1 + y0) / 2, 0.5 * crop_scale
            x0, y0 = max(cx - w * d, 0), max(cy - h * d, 0)
            x1, y1 = min(cx + w * d, width), min(cy + h * d, height)
        crop_boxes.append((x0, y0, x1, y1))
    return _sample(image, cells, crop_boxes, size, crop_size, mean, std)


def proposal_regions(image, proposals: Sequence[Sequence[float]], rng: random.Random, mean: Sequence[float],
                     std: Sequence[float], size: int = IMAGE_SIZE, crop_size: int = 224,
                     max_boxes: int = MAX_BOXES, min_box: int = MIN_BOX, max_box: int = MAX_BOX) -> Regions:
    """"Region proposals" (``ProposalDistillDataset.__getitem__``): COCO ``[x, y, w, h]`` boxes in
    the original image's pixels, shuffled, the first ``max_boxes`` kept, those with area under
    ``min_box²`` or over ``max_box²`` dropped; each crop is its box enlarged 1.5× about its centre
    (clipped). With none left, the image's top-left quarter stands in (as the official code)."""
    image = _as_pil(image)
    width, height = image.size
    order = list(range(len(proposals)))
    rng.shuffle(order)
    boxes, crop_boxes = [], []
    for index in order[:max_boxes]:
        x, y, w, h = (float(v) for v in proposals[index])
        if w * h < min_box ** 2 or w * h > max_box ** 2:
            continue
        cx, cy = x + w * 0.5, y + h * 0.5
        crop_boxes.append((max(cx - w * 0.75, 0), max(cy - h * 0.75, 0), min(cx + w * 0.75, width),
                           min(cy + h * 0.75, height)))
        boxes.append([x, y, x + w, y + h])
    if not boxes:
        boxes = [[0, 0, width / 4, height / 4]]
        crop_boxes = [(0, 0, width // 4, height // 4)]
    return _sample(image, torch.tensor(boxes, dtype=torch.float32), crop_boxes, size, crop_size, mean, std)


# --------------------------------------------------------------------------------------------
# Student, teacher, loss


def student_dense(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The student's dense map ``[B, D, h, w]``, L2-normalised per token (``encode_dense``)."""
    blocks = visual.transformer.resblocks
    p_h, p_w = visual.patch_size
    h, w = images.shape[-2] // p_h, images.shape[-1] // p_w
    x = runner.embed(visual, images, resize="size")  # B, 1+hw, W
    x, _ = runner.run_blocks(visual, x, 0, len(blocks) - 1)  # B, 1+hw, W
    x = dense.maskclip_block(blocks[-1], x, (h, w))  # B, 1+hw, W
    tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # B, hw, D
    tokens = F.normalize(tokens, dim=-1)
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)  # B, D, h, w


def box_features(feature_map: torch.Tensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1×1 RoIAlign (aligned, adaptive sampling) of ``feature_map [B, D, h, w]`` at each image's
    normalised boxes ``[K_i, 4]`` scaled to its grid: ``[R, D]``, ``R = Σ K_i``."""
    from torchvision.ops import roi_align

    h, w = feature_map.shape[-2:]
    scale = feature_map.new_tensor([w, h, w, h])
    rois = [b.to(feature_map) * scale for b in boxes]
    return roi_align(feature_map, rois, (1, 1), 1.0, -1, True)[..., 0, 0]  # R, D


def student_region_features(visual: nn.Module, images: torch.Tensor,
                            boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """One feature a box ``[R, D]`` (not re-normalised): ``box_features`` of ``student_dense``."""
    return box_features(student_dense(visual, images), boxes)


def teacher_features(teacher: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """The frozen original tower's image embedding (class token, ``ln_post``, projection) of each
    crop ``[R, 3, c, c]`` → ``[R, D]`` (not normalised)."""
    with torch.no_grad():
        return dense.encode_tokens(teacher, crops, "vanilla")[:, 0]  # R, D


def clipself_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 − mean_r cos(s_r, t_r)`` over ``[R, D]`` pairs."""
    return 1.0 - (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1).mean()


# --------------------------------------------------------------------------------------------
# What trains, and what is kept


def trainable_parameters(visual: nn.Module) -> list[str]:
    """Freeze ``visual`` but its transformer blocks (the official ``lock`` with every block
    unlocked); returns the names of the parameters left trainable."""
    names = []
    for name, param in visual.named_parameters():
        param.requires_grad = name.startswith("transformer.resblocks.")
        if param.requires_grad:
            names.append(name)
    return names


def no_decay(name: str, param: torch.Tensor) -> bool:
    """The official ``exclude`` rule: no weight decay for 1-d tensors, biases, norms, the logit scale."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: ``no_decay`` ones at 0, the rest at ``weight_decay``."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay}]


@torch.no_grad()
def ensemble(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], alpha: float) -> dict:
    """``α · student + (1 − α) · teacher`` for every tensor (``student_teacher_ensemble``); integer
    tensors are taken from the student (equal to the teacher's where frozen)."""
    if set(student) != set(teacher):
        raise OvdenseError(f"student and teacher differ in keys: {sorted(set(student) ^ set(teacher))[:5]}")
    out = {}
    for key, value in student.items():
        floating = value.is_floating_point()
        out[key] = value * alpha + teacher[key] * (1.0 - alpha) if floating else value.clone()
    return out


class CLIPSelf(nn.Module):
    """The student tower (trainable blocks) and a frozen copy of it as it was (the teacher).

    ``forward(images [B, 3, S, S], boxes [K_i, 4] per image, crops [R, 3, c, c])`` → the loss; the
    crops are the ``R = Σ K_i`` regions in the same order. ``merged(alpha)`` is the tower to save."""

    def __init__(self, visual: nn.Module, name: str = "the backbone"):
        super().__init__()
        dense.check_supported(visual, name)
        self.student = visual
        self.teacher = copy.deepcopy(visual).eval()
        for param in self.teacher.parameters():
            param.requires_grad = False
        trainable_parameters(self.student)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor, boxes: Sequence[torch.Tensor],
                crops: torch.Tensor) -> torch.Tensor:
        if sum(len(b) for b in boxes) != len(crops):
            raise OvdenseError(f"{sum(len(b) for b in boxes)} boxes but {len(crops)} crops")
        target = teacher_features(self.teacher, crops)  # R, D
        return clipself_loss(student_region_features(self.student, images, boxes), target)

    def merged(self, alpha: float) -> dict[str, torch.Tensor]:
        return ensemble(self.student.state_dict(), self.teacher.state_dict(), alpha)
