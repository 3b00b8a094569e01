"""Region recognition: how well a backbone names the segments of a panoptic dataset from its dense
features (boxes, masks) and from crops (the class token, the ceiling).

CLIPSelf's benchmark (Wu et al., ICLR 2024, Table 1 and §4.1; official wusize/CLIPSelf
``src/training/data.py`` ``COCOPanopticDataset`` and ``src/training/zero_shot.py``), followed here:

* every segment of an image (the first 100) is a region, labelled with its category's index in the
  categories sorted by id; a *thing*'s box is its annotated box and its crop that box enlarged 1.5×
  about its centre (clipped); a *stuff* segment's box and crop are the tight box of its mask (the
  official ``mask2box``: inclusive last row and column). Regions under 8² or over 1024² pixels are
  left out;
* the image goes to the dense path as CLIPSelf's student sees it (``train.clipself``: long side
  ``image_size``, zero pixels bottom-right); a region's **box** feature is the 1×1 RoIAlign of the
  normalised dense map at its box, its **mask** feature the mean of the normalised dense map over its
  mask resized to the token grid (``ResizeLongest(image_size / patch)``: bicubic, then ``> 0``), its
  **crop** feature the class token of its crop (long side ``crop_size``, centred zero pixels);
* each feature is L2-normalised and scored against the class embeddings (ViLD's 63 templates,
  ``"vild"``); a region is right at top-k when its label is among the k best;
* the result is the mean over classes of the per-class accuracy (classes without regions skipped),
  for things and stuff apart; each class's accuracy is rounded to float16 first, as the official
  ``macc_with_is_thing`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.errors import OvdenseError
from ovdense.io import load_image
from ovdense.train import clipself as cs

KINDS = ("boxes", "masks", "crops")
MAX_REGIONS, MIN_SIZE, MAX_SIZE = 100, 8, 1024


@dataclass
class PanopticImage:
    """One image of a panoptic dataset: ``rgb [H, W, 3]``, ``ids [H, W]`` (segment ids) and its
    ``segments`` (``id``, ``category_id``, ``bbox``: the ``segments_info`` entries)."""

    rgb: np.ndarray
    ids: np.ndarray
    segments: list[dict]


def read_panoptic(json_path: str | Path, image_dir: str | Path,
                  segment_dir: str | Path) -> tuple[list[dict], Iterator[PanopticImage]]:
    """COCO's panoptic layout: the categories sorted by id (``id``, ``name``, ``isthing``) and the
    images, read one at a time (``segment_dir/<file_name>.png``: ``id = R + 256·G + 256²·B``)."""
    from PIL import Image

    path = Path(json_path)
    if not path.is_file():
        raise OvdenseError(f"panoptic annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images = {i["id"]: i for i in data["images"]}
        annotations = list(data["annotations"])
        for c in categories:
            c["isthing"] = int(c["isthing"])
    except (ValueError, KeyError, TypeError) as e:
        raise OvdenseError(f"{path} is not a COCO panoptic file (categories with isthing, images, "
                           f"annotations with segments_info): {e}") from e

    def samples() -> Iterator[PanopticImage]:
        for ann in annotations:
            info = images[ann["image_id"]]
            rgb = load_image(Path(image_dir) / info["file_name"])
            segment_png = Path(segment_dir) / ann["file_name"]
            if not segment_png.is_file():
                raise OvdenseError(f"panoptic segment PNG not found: {segment_png}")
            encoded = np.asarray(Image.open(segment_png).convert("RGB"), dtype=np.uint32)
            ids = encoded[..., 0] + 256 * encoded[..., 1] + 256 * 256 * encoded[..., 2]
            if ids.shape != rgb.shape[:2]:
                raise OvdenseError(f"{segment_png} is {ids.shape[1]}x{ids.shape[0]}, its image "
                                   f"{rgb.shape[1]}x{rgb.shape[0]}")
            yield PanopticImage(rgb, ids.astype(np.int64), list(ann["segments_info"]))

    return categories, samples()


@dataclass
class Regions:
    """An image's regions as the benchmark scores them: ``image [3, S, S]`` (normalised), ``boxes
    [K, 4]`` normalised to it, ``masks [K, S/p, S/p]`` bool on the token grid, ``crops [K, 3, c, c]``,
    ``labels [K]`` (category indices), ``is_thing [K]``."""

    image: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    crops: torch.Tensor
    labels: torch.Tensor
    is_thing: torch.Tensor


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.where(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _resize_mask(mask: np.ndarray, grid: int) -> torch.Tensor:
    """``ResizeLongest(grid)`` of a float mask (torchvision's bicubic, antialiased), zero bottom-right,
    then ``> 0``: ``[grid, grid]`` bool."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    h, w = mask.shape
    scale = grid / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    resized = TF.resize(torch.from_numpy(mask).float()[None], [new_h, new_w], InterpolationMode.BICUBIC)
    resized = F.pad(resized, (0, grid - new_w, 0, grid - new_h))
    return resized[0] > 0.0


def prepare(sample: PanopticImage, categories: Sequence[dict], mean: Sequence[float], std: Sequence[float],
            patch: int, image_size: int = 1024, crop_size: int = 224) -> Regions:
    """The regions of one image (``COCOPanopticDataset.__getitem__``)."""
    from PIL import Image

    label_of = {c["id"]: i for i, c in enumerate(categories)}
    thing_of = {c["id"]: c["isthing"] for c in categories}
    image = Image.fromarray(sample.rgb)
    img_w, img_h = image.size
    student, scale = cs.resize_longest(image, image_size, mean, std, centre=False)
    boxes, masks, crops, labels, things = [], [], [], [], []
    for segment in sample.segments[:MAX_REGIONS]:
        mask = sample.ids == segment["id"]
        if segment["category_id"] not in label_of:
            raise OvdenseError(f"segment {segment['id']} has category {segment['category_id']}, which the "
                               "file's categories do not list")
        is_thing = thing_of[segment["category_id"]]
        if is_thing:
            x, y, w, h = (float(v) for v in segment["bbox"])
            cx, cy = x + w * 0.5, y + h * 0.5
            crop = (max(cx - w * 0.75, 0), max(cy - h * 0.75, 0), min(cx + w * 0.75, img_w),
                    min(cy + h * 0.75, img_h))
        else:
            if not mask.any():
                continue
            x0, y0, x1, y1 = _mask_box(mask)
            x, y, w, h = x0, y0, x1 - x0, y1 - y0
            crop = (x0, y0, x1, y1)
        if w * h < MIN_SIZE ** 2 or w * h > MAX_SIZE ** 2:
            continue
        crops.append(cs.resize_longest(image.crop(crop), crop_size, mean, std, centre=True)[0])
        masks.append(_resize_mask(mask.astype(np.float32), image_size // patch))
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[segment["category_id"]])
        things.append(bool(is_thing))
    grid = image_size // patch
    return Regions(
        image=student,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale / image_size,
        masks=torch.stack(masks) if masks else torch.zeros(0, grid, grid, dtype=torch.bool),
        crops=torch.stack(crops) if crops else torch.zeros(0, 3, crop_size, crop_size),
        labels=torch.tensor(labels, dtype=torch.long), is_thing=torch.tensor(things, dtype=torch.bool))


def region_features(visual: nn.Module, regions: Regions) -> dict[str, torch.Tensor]:
    """The three features of each region, L2-normalised, ``[K, D]`` each (``KINDS``)."""
    images = regions.image[None].to(visual.proj.device)  # 1, 3, S, S
    dense = cs.student_dense(visual, images)  # 1, D, h, w (normalised per token)
    boxes = cs.box_features(dense, [regions.boxes])  # K, D
    masks = regions.masks.to(dense).flatten(1)  # K, hw
    pooled = masks @ dense[0].flatten(1).T / (masks.sum(1, keepdim=True) + 1e-12)  # K, D
    crops = cs.teacher_features(visual, regions.crops.to(dense))  # K, D
    return {k: F.normalize(v, dim=-1) for k, v in zip(KINDS, (boxes, pooled, crops))}


def top5_correct(features: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[K, 5]`` bool: whether the k-th best class of each region is its label."""
    top5 = (features @ text.T).topk(min(5, text.shape[0]), dim=-1).indices  # K, 5
    return top5 == labels.view(-1, 1).to(top5.device)


def mean_class_accuracy(correct: torch.Tensor, labels: torch.Tensor, is_thing: torch.Tensor) -> dict:
    """Mean per-class top-1 / top-5 accuracy of things and of stuff (``zero_shot.macc_with_is_thing``):
    ``{"thing": {"top1", "top5"}, "stuff": {…}}``; a part without regions gets ``None``."""

    def macc(hits: torch.Tensor, classes: torch.Tensor) -> float | None:
        if len(classes) == 0:
            return None
        per_class = [hits[classes == c].float().mean().half().item() for c in torch.unique(classes)]
        return sum(per_class) / len(per_class)

    out = {}
    for part, chosen in (("thing", is_thing), ("stuff", ~is_thing)):
        hits, classes = correct[chosen], labels[chosen]
        out[part] = dict(top1=macc(hits[:, 0], classes), top5=macc(hits.any(dim=1), classes))
    return out


def evaluate(visual: nn.Module, text: torch.Tensor, samples: Sequence[Regions] | Iterator[Regions],
             progress: bool = True) -> dict:
    """Region recognition of ``visual`` against class embeddings ``text [C, D]`` over prepared
    images: ``{kind: mean_class_accuracy}`` for boxes, masks and crops, and ``regions``, the count."""
    from tqdm import tqdm

    correct: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    labels, things = [], []
    with torch.no_grad():
        for regions in tqdm(samples, desc="regions", unit="image", disable=not progress):
            if len(regions.labels) == 0:
                continue
            features = region_features(visual, regions)
            for kind in KINDS:
                hits = top5_correct(features[kind], text.to(features[kind]), regions.labels)
                correct[kind].append(hits.cpu())
            labels.append(regions.labels)
            things.append(regions.is_thing)
    if not labels:
        raise OvdenseError("no region to score: every segment was empty, under 8² or over 1024² pixels")
    labels_all, things_all = torch.cat(labels), torch.cat(things)
    result = {k: mean_class_accuracy(torch.cat(correct[k]), labels_all, things_all) for k in KINDS}
    result["regions"] = int(len(labels_all))
    return result
