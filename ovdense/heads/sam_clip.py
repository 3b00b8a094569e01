"""SAM mask proposals classified by CLIP: one dense CLIP pass per image, instance and semantic outputs.

SAM (Kirillov et al., "Segment Anything", ICCV 2023) gives crisp masks without labels; CLIP gives
labels with blurry masks. The common recipe crops every mask and re-encodes it (and the text)
with CLIP, hundreds of CLIP passes per image. Here every mask is classified from one dense pass:

1. ``set_image``: SAM's image embedding (``SamPredictor.set_image``, once) and the dense CLIP
   features ``[1, D, h, w]`` of the whole image from any training-free method
   (``backbone.encode_dense(x, method)``, once), the image resized so its short side is
   ``short_side`` and each side is a multiple of the patch size;
2. ``predict``: proposals ``[M, H, W]`` from segment-anything's automatic mask generator (its
   defaults: 32 points per side, predicted IoU 0.88, stability 0.95, box NMS 0.7), from point or
   box prompts, or given masks;
3. ``classify_masks``: each mask's embedding is the area-weighted mean of the features under it
   at feature resolution (``kernels.mask_pool``: mask-pooled CLIP classification), L2-normalised;
   optionally, for masks smaller than ``crop_area`` of the image, blended with the CLIP image
   embedding of its masked crop (the mask's box, pixels outside the mask filled with the mean
   colour, resized to the model's native size: OVSeg, Liang et al., CVPR 2023), ``(1 − λ)·pooled
   + λ·crop`` renormalised; then ``softmax(logit_scale · cosine)`` over all prompts, a class's
   probability the max over its synonyms (the Segmenter's rule, ``kernels.reference.class_max``);
   a mask whose best probability is below ``unknown_threshold``, or that covers no pixel, is
   unknown (label ``-1``);
4. outputs: the instances (class, score, COCO box, area, COCO RLE via pycocotools) and a semantic
   map where each pixel takes the label of the highest-scoring mask covering it (ties: the mask
   listed first), uncovered pixels and unknown masks 0 — so, as with the Segmenter, put the
   background class first.

segment-anything and pycocotools come with ``pip install 'ovdense[sam]'``; they are imported only
when used. SAM checkpoints are read with ``torch.load(weights_only=True)`` and loaded strictly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from ovdense.backbone.clip import ClipBackbone, _load_checkpoint_file
from ovdense.backbone.dense import METHODS
from ovdense.backbone.prompts import ClassSpec, Templates, Vocabulary
from ovdense.data import rle
from ovdense.errors import OvdenseError, strip_unpickling_advice
from ovdense.heads.training_free import SegmentationResult, rescale_size
from ovdense.io import ImageInput, load_image, overlay, palette, write_image, write_json, write_label_png
from ovdense.kernels.pooling import mask_pool
from ovdense.kernels.reference import class_max

SAM_INSTALL = "pip install 'ovdense[sam]'"
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS = {  # the official file of each model type
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}


def _segment_anything():
    try:
        import segment_anything
    except ImportError as e:
        raise OvdenseError(f"SAM + CLIP needs segment-anything: {SAM_INSTALL}") from e
    return segment_anything


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise OvdenseError(f"COCO RLE output needs pycocotools: {SAM_INSTALL}") from e
    return mask_utils


def load_sam(checkpoint: str | Path | None, model_type: str | None = None,
             device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build a SAM model and load its checkpoint strictly (``torch.load(weights_only=True)``).

    Args:
        checkpoint: the official ``.pth`` file (``SAM_CHECKPOINTS``, from ``SAM_URL``).
        model_type: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``; ``None`` = read from the file name
            (the official names contain it).
    Raises:
        OvdenseError: no or a missing checkpoint (names the expected file and where to get it),
            an unknown model type, or a checkpoint that does not fit (names the keys).
    """
    if model_type is None and checkpoint is not None:
        model_type = next((t for t in SAM_CHECKPOINTS if t in Path(checkpoint).name), None)
        if model_type is None:
            raise OvdenseError(f"cannot tell the SAM model type from {Path(checkpoint).name!r}; "
                               f"give it: {', '.join(SAM_CHECKPOINTS)} (CLI: --sam-model)")
    model_type = model_type or "vit_b"
    if model_type not in SAM_CHECKPOINTS:
        raise OvdenseError(f"unknown SAM model {model_type!r}; choose from: {', '.join(SAM_CHECKPOINTS)}")
    expected = SAM_CHECKPOINTS[model_type]
    where = f"download {SAM_URL}{expected} and pass its path"
    if checkpoint is None:
        raise OvdenseError(f"SAM needs a checkpoint ({expected} for {model_type}): {where} "
                           "(CLI: --sam-checkpoint PATH)")
    if not Path(checkpoint).is_file():
        raise OvdenseError(f"SAM checkpoint not found: {checkpoint}; {model_type} expects {expected}: "
                           f"{where}")
    registry = _segment_anything().sam_model_registry
    if Path(checkpoint).stat().st_size == 0:
        raise OvdenseError(f"SAM checkpoint {checkpoint} is empty; {model_type} expects {expected}: {where}")
    sam = registry[model_type](checkpoint=None)  # random init, then load
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: the file is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            _load_checkpoint_file(sam, str(checkpoint))
    except OvdenseError as e:
        reason = strip_unpickling_advice(str(e))  # never the advice to load with weights_only=False
        types = ", ".join(SAM_CHECKPOINTS)
        raise OvdenseError(f"{reason} (SAM model type {model_type}; types: {types})") from e
    return sam.to(device).eval()


# --------------------------------------------------------------------------------------------
# The tensor path


def classify_masks(
    features: torch.Tensor,
    masks: torch.Tensor,
    text: torch.Tensor,
    class_of_prompt: torch.Tensor,
    logit_scale: float,
    unknown_threshold: float | None = None,
    crop_embeddings: torch.Tensor | None = None,
    crop_weight: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classify masks by the dense features pooled under them (a pure function).

    Args:
        features: ``[B, D, h, w]`` dense CLIP features (L2-normalised per cell).
        masks: ``[B, M, H, W]`` bool proposals covering the same image as ``features``.
        text: ``[Q, D]`` L2-normalised prompt embeddings; ``class_of_prompt``: ``[Q]`` int64.
        logit_scale: the softmax's temperature factor.
        unknown_threshold: masks whose best class probability is below it get label ``-1``.
        crop_embeddings: optional ``[B, M, D]`` L2-normalised embeddings of the masked crops,
            blended as ``normalize((1 − λ)·pooled + λ·crop)`` with ``λ = crop_weight`` (a float
            or ``[B, M]``; 0 where a mask has no crop).
    Returns:
        ``labels [B, M]`` int64 (``-1``: unknown, or a mask of zero area), ``scores [B, M]``
        (best class probability; 0 for a zero-area mask) and ``class_probs [B, M, C]``.
    """
    pooled, valid = mask_pool(features, masks.to(features.device))  # B, M, D
    embeddings = F.normalize(pooled, dim=-1)  # B, M, D (zeros stay zeros)
    if crop_embeddings is not None:
        weight = torch.as_tensor(crop_weight, dtype=torch.float32, device=pooled.device)
        weight = weight.expand(pooled.shape[:2])[..., None]  # B, M, 1
        embeddings = F.normalize((1 - weight) * embeddings + weight * crop_embeddings.float(), dim=-1)
    logits = torch.einsum("bmd,qd->bqm", embeddings, text.float())  # B, Q, M
    probs = torch.softmax(logit_scale * logits, dim=1)[..., None]  # B, Q, M, 1
    class_probs = class_max(probs, class_of_prompt.to(probs.device), int(class_of_prompt.max()) + 1)
    class_probs = class_probs[..., 0].transpose(1, 2)  # B, M, C
    scores, labels = class_probs.max(dim=2)  # B, M
    unknown = ~valid.to(labels.device)
    if unknown_threshold is not None:
        unknown |= scores < unknown_threshold
    labels = torch.where(unknown, torch.full_like(labels, -1), labels)
    scores = torch.where(valid.to(scores.device), scores, torch.zeros_like(scores))
    return labels, scores, class_probs


def semantic_map(
    masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``masks [M, H, W]`` (bool), ``labels [M]``, ``scores [M]`` → labels and scores ``[H, W]``.

    Each pixel takes the label of the highest-scoring mask covering it (ties: the mask listed
    first) and that mask's score; uncovered pixels are 0 with score 0, unknown masks (``-1``)
    paint 0. Masks are painted from the lowest to the highest rank, so memory stays ``O(H·W)``.
    """
    M, H, W = masks.shape
    out_labels = torch.zeros(H, W, dtype=torch.int64, device=masks.device)
    out_scores = torch.zeros(H, W, dtype=torch.float32, device=masks.device)
    order = np.lexsort((-np.arange(M), scores.float().cpu().numpy()))  # by score, then later index first
    for m in order:
        out_labels[masks[m]] = max(int(labels[m]), 0)
        out_scores[masks[m]] = float(scores[m])
    return out_labels, out_scores


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Instance:
    """One classified mask: ``label`` indexes the classes (``-1`` unknown), ``box`` is COCO
    ``[x, y, w, h]`` in pixels, ``area`` in pixels, ``mask`` ``[H, W]`` bool."""

    mask: np.ndarray
    label: int
    name: str
    score: float
    box: list[float]
    area: int

    def rle(self) -> dict:
        """The mask as compressed COCO RLE (pycocotools), ``counts`` as text for JSON."""
        rle = _mask_utils().encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}

    def to_coco(self, image_id) -> dict:
        """A COCO results entry (``category_id`` is the class index, ``-1`` for unknown)."""
        return {"image_id": image_id, "category_id": self.label, "category_name": self.name,
                "segmentation": self.rle(), "score": self.score, "bbox": self.box, "area": self.area}


@dataclass
class SamClipResult(SegmentationResult):
    """A ``SegmentationResult`` (``labels``, ``scores`` ``[H, W]``: the semantic map and the
    winning mask's probability) plus the ``instances``, in proposal order."""

    instances: list[Instance] = field(default_factory=list)

    OUTPUTS = ("_labels.png", "_overlay.jpg", "_instances.json")

    def to_coco(self, image_id) -> list[dict]:
        """The instances as a COCO results list (loadable by ``pycocotools.COCO.loadRes``)."""
        return [instance.to_coco(image_id) for instance in self.instances]

    def to_json(self, image_id=None, **info) -> dict:
        """The semantic map's JSON (``SegmentationResult.to_json``) with the ``instances`` as
        COCO results of ``image_id``."""
        report = super().to_json(**info)
        report["instances"] = self.to_coco(image_id)
        return report

    def overlay(self, image: ImageInput) -> np.ndarray:
        """``draw_instances``: the colour map and legend with each mask's outline and label."""
        return draw_instances(load_image(image), self)

    def save(self, out_dir: str | os.PathLike, stem: str, image: ImageInput, /, **info) -> list[Path]:
        """Write ``<stem>_labels.png``, ``<stem>_overlay.jpg`` and ``<stem>_instances.json``
        (the COCO results, image id ``stem``; ``info`` is not written) in ``out_dir``."""
        out = Path(out_dir)
        return [write_label_png(out / f"{stem}_labels.png", self.labels),
                write_image(out / f"{stem}_overlay.jpg", self.overlay(image)),
                write_json(out / f"{stem}_instances.json", self.to_coco(stem))]


def draw_instances(rgb: np.ndarray, result: SamClipResult) -> np.ndarray:
    """The usual overlay (``io.overlay``: colour map and legend) with each mask's outline in
    its class colour (white if unknown) and its class name and score at its box's corner."""
    canvas = np.array(overlay(rgb, result.labels, result.classes))  # writable copy
    colours = palette()
    for inst in result.instances:
        if inst.area == 0:
            continue
        colour = (255, 255, 255) if inst.label < 0 else tuple(int(c) for c in colours[inst.label % 256])
        contours, _ = cv2.findContours(inst.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colour, 1)
        origin = (int(inst.box[0]) + 1, max(int(inst.box[1]) + 9, 9))
        for ink, thickness in (((0, 0, 0), 2), ((255, 255, 255), 1)):  # white on a dark edge
            cv2.putText(canvas, f"{inst.name} {inst.score:.2f}", origin, cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                        ink, thickness, cv2.LINE_AA)
    return canvas


# --------------------------------------------------------------------------------------------
# The head


class SamClipSegmenter:
    """SAM proposals classified from one dense CLIP pass (see the module doc).

    Use like ``SamPredictor``: ``set_image(image)`` once, then ``predict()`` (automatic masks),
    ``predict(points=…)``, ``predict(boxes=…)`` or ``predict(masks=…)`` as often as wanted;
    ``predict(image)`` sets the image first (every segmentation head's call).

    Built as every segmentation head, ``SamClipSegmenter(backbone, classes, sam=load_sam(path))``;
    the earlier order ``(backbone, sam, classes)`` still works (a ``Sam`` or ``None`` second).

    Args:
        backbone: the shared CLIP backbone.
        classes: class names; commas (or a list) give synonyms; class 0 is what uncovered pixels
            get, so put the background first.
        sam: a segment-anything ``Sam`` (``load_sam``), or ``None`` to classify given masks only.
        templates: as for ``Segmenter`` (``None``: the backbone's own, else ``"imagenet80"``).
        method: the training-free method whose dense features are pooled.
        short_side: CLIP's input short side (``None``: the backbone's own, else the method's;
            ``0`` keeps the size); sides are rounded to patch multiples.
        logit_scale: ``None`` = the method's.
        unknown_threshold: masks whose best probability is below it are unknown.
        crop_area: masks smaller than this fraction of the image are blended with their masked
            crop's embedding (``None``: off, one CLIP pass).
        crop_weight: ``λ`` of that blend.
        points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
            box_nms_thresh, min_mask_region_area: segment-anything's automatic mask generator's
            (its defaults).
        crop_batch: crops sent through CLIP at once.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        classes: Sequence[ClassSpec] | Vocabulary | torch.nn.Module | None,
        sam: torch.nn.Module | Sequence[ClassSpec] | Vocabulary | None = None,
        templates: Templates | None = None,
        method: str = "clearclip",
        short_side: int | None = None,
        logit_scale: float | None = None,
        unknown_threshold: float | None = None,
        crop_area: float | None = None,
        crop_weight: float = 0.5,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        crop_batch: int = 32,
    ):
        if classes is None or isinstance(classes, torch.nn.Module):  # the order (backbone, sam, classes)
            classes, sam = sam, classes
        if method not in METHODS:
            raise OvdenseError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
        protocol = METHODS[method].protocol
        own = backbone.defaults
        self.backbone = backbone
        self.method = method
        self.vocabulary = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        self.templates = templates if templates is not None else own.get("templates", "imagenet80")
        if short_side is None:
            short_side = own.get("short_side", protocol.short_side)
        self.short_side = int(short_side)
        self.logit_scale = float(protocol.logit_scale if logit_scale is None else logit_scale)
        self.unknown_threshold = unknown_threshold
        self.crop_area = crop_area
        self.crop_weight = float(crop_weight)
        self.crop_batch = int(crop_batch)
        for name in ("unknown_threshold", "crop_area", "crop_weight"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise OvdenseError(f"{name} must lie in [0, 1], got {value}")
        if self.logit_scale <= 0 or self.short_side < 0 or self.crop_batch < 1:
            raise OvdenseError("logit_scale and crop_batch must be positive and short_side ≥ 0")
        self.text = backbone.encode_text(self.vocabulary.prompts, self.templates)  # Q, D
        self.class_of_prompt = torch.tensor(self.vocabulary.class_of_prompt, device=backbone.device)
        self.sam_options = {
            "points_per_side": points_per_side, "points_per_batch": points_per_batch,
            "pred_iou_thresh": pred_iou_thresh, "stability_score_thresh": stability_score_thresh,
            "box_nms_thresh": box_nms_thresh, "min_mask_region_area": min_mask_region_area,
        }
        self.generator = None
        if sam is not None:
            if points_per_side < 1 or points_per_batch < 1:
                raise OvdenseError("points_per_side and points_per_batch must be ≥ 1")
            self.generator = _segment_anything().SamAutomaticMaskGenerator(sam, **self.sam_options)
        self._rgb: np.ndarray | None = None
        self._features: torch.Tensor | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.vocabulary.names

    def settings(self) -> dict:
        """Every setting that shapes the output."""
        return {
            "method": self.method,
            "templates": self.templates if isinstance(self.templates, str) else list(self.templates),
            "short_side": self.short_side,
            "logit_scale": self.logit_scale,
            "unknown_threshold": self.unknown_threshold,
            "crop_area": self.crop_area,
            "crop_weight": self.crop_weight,
            **self.sam_options,
        }

    # ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def set_image(self, image: ImageInput) -> None:
        """Load the image; compute SAM's image embedding and the dense CLIP features, once."""
        rgb = load_image(image)
        if self.generator is not None:
            self.generator.predictor.set_image(rgb)
        H, W = rgb.shape[:2]
        p = self.backbone.patch_size
        h, w = rescale_size(H, W, self.short_side) if self.short_side else (H, W)
        h, w = max(p, round(h / p) * p), max(p, round(w / p) * p)  # the grid covers the whole image
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != (H, W) else rgb
        x = self.backbone.to_tensor(resized)  # 1, 3, h, w
        self._features = self.backbone.encode_dense(x, self.method)  # 1, D, h/p, w/p
        self._rgb = rgb

    @torch.inference_mode()
    def predict(self, image: ImageInput | None = None, *, points: ArrayLike | None = None,
                boxes: ArrayLike | None = None, masks: ArrayLike | None = None) -> SamClipResult:
        """Classify the proposals of ``image`` (``set_image`` first), or of the image set by
        ``set_image``.

        Args:
            image: a path, PIL image or RGB array; ``None``: the image set by ``set_image``.
            points: ``[N, 2]`` pixel ``(x, y)`` foreground points, one object each (SAM's best
                of its three masks by predicted IoU).
            boxes: ``[K, 4]`` pixel ``(x1, y1, x2, y2)`` boxes, one object each.
            masks: ``[M, H, W]`` bool proposals of your own (SAM is not run).
            With none of them, SAM's automatic mask generator proposes the masks. Masks come in
            the order points, boxes.
        """
        if image is not None:
            self.set_image(image)
        if self._rgb is None:
            raise OvdenseError("no image set: call set_image(image) before predict()")
        H, W = self._rgb.shape[:2]
        if masks is not None:
            proposals = torch.as_tensor(np.asarray(masks)).bool().to(self.backbone.device)
            if proposals.dim() != 3 or tuple(proposals.shape[1:]) != (H, W):
                raise OvdenseError(
                    f"masks must be [M, {H}, {W}] for this image, got {tuple(proposals.shape)}"
                )
        elif self.generator is None:
            raise OvdenseError("no SAM model: pass sam=load_sam(checkpoint) or give masks=")
        elif points is None and boxes is None:
            proposals = self._automatic_masks()
        else:
            proposals = self._prompted_masks(points, boxes)
        return self._classify(proposals)

    def segment(self, image: ImageInput, points: ArrayLike | None = None, boxes: ArrayLike | None = None,
                masks: ArrayLike | None = None) -> SamClipResult:
        """``set_image(image)`` then ``predict(...)``."""
        self.set_image(image)
        return self.predict(points=points, boxes=boxes, masks=masks)

    def _automatic_masks(self) -> torch.Tensor:
        """``SamAutomaticMaskGenerator.generate`` for its one whole-image crop (``crop_n_layers
        = 0``) on the embedding ``set_image`` computed (``generate`` would encode the image
        again): point batches, quality filters, box NMS, optional small-region clean-up."""
        from segment_anything.utils.amg import MaskData, batch_iterator, rle_to_mask
        from torchvision.ops import batched_nms

        gen = self.generator
        H, W = self._rgb.shape[:2]
        data = MaskData()
        for (points,) in batch_iterator(gen.points_per_batch, gen.point_grids[0] * np.array([[W, H]])):
            data.cat(gen._process_batch(points, (H, W), [0, 0, W, H], (H, W)))
        keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                           torch.zeros(len(data["boxes"]), device=data["boxes"].device),
                           iou_threshold=gen.box_nms_thresh)
        data.filter(keep)
        data.to_numpy()
        if gen.min_mask_region_area > 0:
            data = gen.postprocess_small_regions(data, gen.min_mask_region_area,
                                                 max(gen.box_nms_thresh, gen.crop_nms_thresh))
        masks = [torch.from_numpy(rle_to_mask(rle)) for rle in data["rles"]]
        return torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)  # M, H, W

    def _prompted_masks(self, points, boxes) -> torch.Tensor:
        """One SAM mask per point (the best of three by predicted IoU) and per box: ``[M, H, W]``."""
        predictor, step = self.generator.predictor, self.generator.points_per_batch
        size = self._rgb.shape[:2]
        found = [torch.zeros(0, *size, dtype=torch.bool, device=predictor.device)]
        if points is not None:
            points = _as_rows(points, 2, "points")
            for start in range(0, len(points), step):
                chunk = predictor.transform.apply_coords(points[start:start + step], size)
                coords = torch.as_tensor(chunk, dtype=torch.float, device=predictor.device)[:, None]  # N,1,2
                labels = torch.ones(len(coords), 1, dtype=torch.int, device=predictor.device)
                masks, iou, _ = predictor.predict_torch(coords, labels, multimask_output=True)  # N, 3, H, W
                found.append(masks[torch.arange(len(masks)), iou.argmax(dim=1)])
        if boxes is not None:
            boxes = _as_rows(boxes, 4, "boxes")
            if len(boxes):
                box = torch.as_tensor(predictor.transform.apply_boxes(boxes, size), dtype=torch.float,
                                      device=predictor.device)
                masks, _, _ = predictor.predict_torch(None, None, boxes=box, multimask_output=False)
                found.append(masks[:, 0])  # K, H, W
        return torch.cat(found)

    def _classify(self, proposals: torch.Tensor) -> SamClipResult:
        proposals = proposals.to(self.backbone.device)  # M, H, W
        area = proposals.flatten(1).sum(dim=1)  # M
        crops, weight = None, 0.0
        if self.crop_area is not None:
            small = (area > 0) & (area < self.crop_area * proposals.shape[1] * proposals.shape[2])
            if small.any():
                crops = self._crop_embeddings(proposals, small)[None]  # 1, M, D
                weight = small.float()[None] * self.crop_weight  # 1, M
        labels, scores, _ = classify_masks(
            self._features, proposals[None], self.text, self.class_of_prompt, self.logit_scale,
            self.unknown_threshold, crops, weight,
        )
        labels, scores = labels[0], scores[0]  # M
        sem_labels, sem_scores = semantic_map(proposals, labels, scores)
        masks = proposals.cpu().numpy()
        instances = []
        for m, mask in enumerate(masks):
            label = int(labels[m])
            name = self.classes[label] if label >= 0 else "unknown"
            instances.append(Instance(mask, label, name, float(scores[m]), rle.bbox(mask), int(area[m])))
        return SamClipResult(sem_labels.cpu().numpy(), sem_scores.cpu().numpy(), self.classes,
                             tuple(self.vocabulary.synonyms()), self.settings(), instances=instances)

    def _crop_embeddings(self, masks: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings ``[M, D]`` of the masked crops of the masks ``which`` selects
        (zeros elsewhere): each mask's box, pixels outside it at the mean colour (0 once
        normalised by the backbone's mean), resized bicubically to the native size (OVSeg)."""
        x = self.backbone.to_tensor(self._rgb)[0].float()  # 3, H, W
        out = torch.zeros(len(masks), self.backbone.embed_dim, device=x.device)
        index = which.nonzero()[:, 0].tolist()
        for start in range(0, len(index), self.crop_batch):
            crops = []
            for m in index[start:start + self.crop_batch]:
                ys, xs = masks[m].nonzero(as_tuple=True)
                y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                region = x[:, y0:y1, x0:x1] * masks[m, y0:y1, x0:x1]  # 3, h, w
                crops.append(F.interpolate(region[None], size=self.backbone.native_size, mode="bicubic",
                                           align_corners=False))
            batch = torch.cat(crops).to(self.backbone.dtype)  # n, 3, native H, native W
            out[index[start:start + self.crop_batch]] = self.backbone.encode_image(batch).float()
        return out


def _as_rows(value: ArrayLike, width: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, width)
    if array.ndim == 1 and array.shape[0] == width:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != width:
        raise OvdenseError(f"{name} must be [N, {width}] pixel coordinates, got shape {array.shape}")
    return array
