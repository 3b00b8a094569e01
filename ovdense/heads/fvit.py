"""Open-vocabulary detection on the frozen shared backbone: F-VLM / F-ViT in plain torch.

F-VLM (Kuo et al., "F-VLM: Open-Vocabulary Object Detection upon Frozen Vision and Language
Models", ICLR 2023) keeps CLIP frozen, trains a detector head on base classes whose classifier is
the text embeddings, and at test time ensembles the head's scores with CLIP's own region scores.
F-ViT (Wu et al., "CLIPSelf", ICLR 2024) is its ViT form. Followed here, file by file:

* wusize/CLIPSelf ``F-ViT/models/evaclip_vit.py`` and wusize/CLIM ``ovdet/ovdet/models/backbones/
  clip_vit.py`` (the mmdet 3.x port on OpenAI ViT-B/16): one frozen pass gives the tokens after
  blocks ``out_indices = (3, 5, 7, 11)`` (B/16; ``(6, 10, 14, 23)`` for L/14), the last block run
  as the value path (``forward_without_attn``: MaskCLIP's block with residual and FFN, here
  ``dense.maskclip_block``); the position embedding reaches the grid by bicubic resizing to the
  exact size (their patched ``rescale_positional_embedding``, ``runner.embed(resize="size")``);
  a simple pyramid — two stride-2 transposed convs with norm + GELU between them (stride p/4),
  one (p/2), identity (p), 2×2 max-pool (2p) — feeds mmdet's FPN (``SimplePyramid``); the
  last block's tokens through ``ln_post`` and ``proj``, L2-normalised, are the dense CLIP map.
* F-ViT ``models/fvit_head.py`` ``FViTBBoxHead`` / CLIM ``fvlm_bbox_heads/convfc_bbox_head.py``:
  the classifier ``τ · normalize(region) · [text; background]ᵀ`` with a learned background
  embedding (initialised from the text embedding of "background", as F-ViT) and a learned
  temperature τ starting at 50 (``OpenVocabClassifier``); novel classes are masked to −∞ in
  training by F-ViT's ``CustomCrossEntropyLoss`` (class weight 0), or — ovdense's default —
  simply absent from the training vocabulary.
* At test time (``FViTRoIHead._bbox_forward`` + ``FViTBBoxHead.forward``): each box's CLIP
  embedding is a 1×1 RoIAlign on the dense CLIP map (``sampling_ratio=0``, ``aligned=True``:
  mmcv's ``RoIAlign(use_torchvision=True)``; ``region_clip_embeddings``), its VLM probabilities
  ``softmax(T_vlm · cos)`` over the same ``[text; background]`` columns (T_vlm = 75 in the
  OV-COCO B/16 configs, 50 in OV-LVIS B/16; ``vlm_probabilities``), and the geometric ensemble
  ``det^(1−α) · vlm^α`` on seen columns, ``det^(1−β) · vlm^β`` on the others, where the
  background column counts as seen and nothing is renormalised (``ensemble``); mmdet's
  ``multiclass_nms`` then drops the background column.

Departures, each deliberate:

* Norm layers. F-ViT puts ``SyncBN`` in the pyramid (and the FPN and box head): it needs several
  processes and does not run on one CPU. ``SimplePyramid`` takes ``norm="group"`` (GroupNorm,
  32 groups: no statistics shared across processes; detectron2's ViTDet pyramid uses LayerNorm) by
  default; ``"batch"``, ``"sync_batch"`` (F-ViT's, for multi-GPU runs) and ``"none"`` are available.
* The region embedding is a linear layer to the joint space ``D`` after the box head's FCs
  (CLIM's ``fc_cls`` rebuilt with ``out_features = D``); F-ViT uses the ReLU'd output of its
  last cls FC, whose width happens to equal ``D``.
* ``out_indices`` for other depths: ``fvit_out_indices`` scales B/16's taps by ``L/12`` (floor)
  and keeps the last block — the rule reproduces F-ViT's L/14 choice ``(6, 10, 14, 23)``; the
  6-block toy gets ``(1, 2, 3, 5)``.

The frozen backbone is always passed in, run in eval mode under ``no_grad``, and never stored
as a submodule: it never enters a head's ``state_dict`` or an optimizer.

Inference needs no OpenMMLab package: ``PlainFViT`` rebuilds, from the head file that
``ovdense.mm.detection.export_head`` writes (state dict + config), exactly what mmdet 3.3's
``TwoStageDetector.predict`` runs for ``OvdenseFViT``, from the plain-torch two-stage parts of
``ovdense.detection`` (FPN or NAS-FPN, RPN, RoI extractor, box and mask heads, NMS; its docstring lists them
and their departures) and F-ViT's own parts (``ovdense.heads.fvit_parts``: the frozen pass, the
pyramid, the open-vocabulary box head and the ensemble). On the same head and image it gives
mmdet's boxes, scores, labels and masks (``tests/test_detector_plain.py``; equal to float32
rounding on CPU). ``Detector`` is the user API on top.

A head file may also bring the class text embeddings its head was trained against
(``StoredText``: names and rows, e.g. the 80 COCO rows of CLIM's published OV-COCO model,
``tools/model_converters/fvit2ovdense.py``). ``Detector`` takes a stored row for a requested class of
the same name and encodes every other class with the backbone's text tower and templates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ovdense.backbone.prompts import check_vocabulary, read_classes
from ovdense.detection.config import check_keys, pop_type, unsupported
from ovdense.detection.necks import build_neck
from ovdense.detection.ops import bbox2roi, multiclass_nms
from ovdense.detection.roi_heads import FCNMaskHead, SingleRoIExtractor
from ovdense.detection.rpn import RPNHead
from ovdense.errors import OvdenseError
from ovdense.heads.fvit_parts import (
    FrozenFeatures,
    OpenVocabBBoxHead,
    OpenVocabClassifier,
    SimplePyramid,
    StoredText,
    ensemble,
    frozen_features,
    fvit_out_indices,
    region_clip_embeddings,
    vlm_probabilities,
    vocabulary_text,
)

# the head's public face: what it defines, and the parts (fvit_parts.py) its users and tests reach here
__all__ = [
    "HEAD_FORMAT", "STORED_TEXT_KEY", "TOY_HEAD_FILE", "TOY_HEAD_FILES", "DetectionResult", "Detector",
    "FrozenFeatures",
    "OpenVocabBBoxHead", "OpenVocabClassifier", "PlainFViT", "SimplePyramid", "StoredText",
    "check_vocabulary", "default_head_checkpoint", "ensemble", "frozen_features", "fvit_out_indices",
    "key_mismatch", "load_head", "load_stored_text", "read_classes", "region_clip_embeddings", "save_head",
    "seen_mask", "vlm_probabilities", "vocabulary_text",
]

HEAD_FORMAT = "ovdense-fvit-head/1"


# --------------------------------------------------------------------------------------------
# The vocabulary


def seen_mask(classes: Sequence[str], training_classes: Sequence[str]) -> torch.Tensor:
    """``[C]`` bool: which classes of a vocabulary were in the training vocabulary (they get α;
    the others, never trained on, get β)."""
    known = set(training_classes)
    return torch.tensor([c in known for c in classes], dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# Head checkpoints: safetensors, tied to the backbone they were trained on


#: The tensor name of a head file's stored class embeddings (``StoredText``; its names and source are
#: the ``stored_text`` metadata entry). Outside every model's state dict: ``load_head`` leaves it out.
STORED_TEXT_KEY = "stored_text.embeddings"


def save_head(path: str | os.PathLike, state: dict[str, torch.Tensor], backbone, config: dict,
              dtype: torch.dtype | None = None, stored_text: StoredText | None = None) -> Path:
    """Write a head's ``state`` (the detector's trained tensors, no backbone) as safetensors with
    ``{"format", "backbone", "config"}`` metadata, atomically (temporary name, then rename).
    ``dtype`` (e.g. ``torch.float16``: half the file, as the SAN head ships) stores the floating
    tensors in that type; ``load_head`` gives them back as float32.

    ``stored_text``: class embeddings the head was trained against (``StoredText``), written as the
    tensor ``STORED_TEXT_KEY`` (always float32: they are the reference, and small) with their names
    and source in the ``stored_text`` metadata entry; ``Detector`` uses them for those names."""
    from safetensors.torch import save

    from ovdense.io import write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": HEAD_FORMAT, "backbone": backbone.identity, "config": json.dumps(config)}
    if stored_text is not None:
        if STORED_TEXT_KEY in tensors:
            raise OvdenseError(f"the head's state already has a tensor {STORED_TEXT_KEY!r}")
        tensors[STORED_TEXT_KEY] = stored_text.embeddings.contiguous()
        metadata["stored_text"] = json.dumps({"names": stored_text.names, "source": stored_text.source})
    return write_bytes(path, save(tensors, metadata=metadata))


def _read_head(path: str | os.PathLike, backbone, stored: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A checked head file's tensors (the model's, or only the stored text's) and its metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"head checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys() if (k == STORED_TEXT_KEY) == stored}
    except Exception as e:  # noqa: BLE001 - a pickle or any unreadable file is the user's wrong file
        raise OvdenseError(
            f"{path} is not a safetensors head checkpoint ({type(e).__name__}); ovdense never unpickles "
            "files: give a head written by ovdense (tools/train.py, save_head)"
        ) from e
    if metadata.get("format") != HEAD_FORMAT:
        raise OvdenseError(f"{path} is not an ovdense F-ViT head (format {metadata.get('format')!r}, "
                           f"expected {HEAD_FORMAT!r})")
    expected = backbone.identity
    if metadata.get("backbone") != expected:
        raise OvdenseError(f"{path} was trained on backbone {metadata.get('backbone')!r}, not this one "
                           f"({expected}); load the backbone it was trained on or retrain the head")
    return state, metadata


def key_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                 ) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` fails to fit a model whose state dict is ``expected``: the keys it lacks, the keys
    it has in excess, and the shared keys of another shape (each sorted; all empty when it fits)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    return missing, unexpected, wrong


def load_head(path: str | os.PathLike, backbone) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a head checkpoint written by ``save_head``: ``(state, config)``; the state holds the
    model's tensors only (stored text embeddings: ``load_stored_text``).

    Raises ``OvdenseError`` for a missing file, a file that is not safetensors (a pickle is never
    unpickled), a file without ovdense's F-ViT metadata, and a head trained on another backbone.
    """
    state, metadata = _read_head(path, backbone, stored=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 files: float32
    return state, json.loads(metadata.get("config", "{}"))


def load_stored_text(path: str | os.PathLike, backbone) -> StoredText | None:
    """The class embeddings a head file brings (``save_head(stored_text=...)``), or ``None`` (heads
    that ovdense trains store none: their text is the backbone's). Checked as ``load_head``."""
    state, metadata = _read_head(path, backbone, stored=True)
    if STORED_TEXT_KEY not in state and "stored_text" not in metadata:
        return None
    try:
        entry = json.loads(metadata["stored_text"])
        stored = StoredText(entry["names"], state[STORED_TEXT_KEY], entry.get("source", ""))
    except (KeyError, TypeError, ValueError, OvdenseError) as e:
        raise OvdenseError(f"{path}: its stored text embeddings are damaged ({type(e).__name__}: {e}); "
                           "convert the head again") from e
    if stored.embeddings.shape[1] != backbone.embed_dim:
        raise OvdenseError(f"{path}: its stored text embeddings have {stored.embeddings.shape[1]} "
                           f"dimensions, the backbone's joint space {backbone.embed_dim}")
    return stored


# --------------------------------------------------------------------------------------------
# Plain-torch inference: mmdet 3.3's two-stage test path with F-ViT's parts


class PlainFViT(nn.Module):
    """F-ViT inference in plain torch: what ``ovdense.mm.detection.OvdenseFViT.predict`` computes
    (mmdet 3.3 ``models/detectors/two_stage.py`` ``TwoStageDetector.predict`` → ``RPNHead.predict``
    with ``rescale=False`` → ``StandardRoIHead.predict``: boxes, then masks on the kept boxes),
    built from a head file's config with the same state-dict keys (``backbone.pyramid.*``,
    ``neck.*``, ``rpn_head.*``, ``roi_head.bbox_head.*``, ``roi_head.mask_head.*``).

    Args:
        backbone: the frozen ``ClipBackbone`` (not a submodule, never in ``state_dict``).
        config: the head file's config (``OvdenseFViT.head_config``).
    """

    def __init__(self, backbone, config: dict):
        super().__init__()
        self._frozen = (backbone,)
        self.training_classes = read_classes(config["classes"])
        self.method = config.get("method") or "maskclip"
        indices = config.get("indices")
        self.indices = tuple(indices) if indices is not None else fvit_out_indices(backbone.num_layers)
        self.templates = config.get("templates") or backbone.defaults.get("templates", "imagenet80")
        self.backbone = nn.Module()
        pyramid = pop_type(config.get("pyramid") or {}, "OvdenseFViTPyramid", "pyramid")
        self.backbone.pyramid = SimplePyramid(backbone.width, **pyramid)
        self.neck = build_neck(config["neck"])
        self.rpn_head = RPNHead(**pop_type(config["rpn_head"], "RPNHead", "rpn_head"))
        roi = pop_type(config["roi_head"], "OvdenseFViTRoIHead", "roi_head")
        self.roi_head = nn.Module()
        self.bbox_roi_extractor = SingleRoIExtractor(**pop_type(roi.pop("bbox_roi_extractor"),
                                                                "SingleRoIExtractor", "bbox_roi_extractor"))
        box = pop_type(roi.pop("bbox_head"), "OvdenseFViTBBoxHead", "bbox_head")
        if box.get("vlm_temperature", 75.0) is None:  # the backbone's own CLIP temperature (OvdenseFViT)
            box["vlm_temperature"] = backbone.logit_scale
        self.roi_head.bbox_head = OpenVocabBBoxHead(embed_dim=backbone.embed_dim, **box)
        self.with_mask = roi.get("mask_head") is not None
        if self.with_mask:
            extractor = pop_type(roi.pop("mask_roi_extractor"), "SingleRoIExtractor", "mask_roi_extractor")
            self.mask_roi_extractor = SingleRoIExtractor(**extractor)
            mask = pop_type(roi.pop("mask_head"), "FCNMaskHead", "mask_head")
            self.roi_head.mask_head = FCNMaskHead(**mask)
        check_keys("OvdenseFViTRoIHead", {k: v for k, v in roi.items() if v is not None},
                   {"shared_head", "mask_head", "mask_roi_extractor"})
        if roi.get("shared_head") is not None:
            raise unsupported("a shared RoI head")
        self.test_cfg = dict(config.get("test_cfg") or {})
        needed = {"rpn": ("nms", "max_per_img"), "rcnn": ("score_thr", "nms", "max_per_img")
                  + (("mask_thr_binary",) if self.with_mask else ())}
        absent = [f"test_cfg.{part}.{key}" for part, keys in needed.items() for key in keys
                  if key not in (self.test_cfg.get(part) or {})]
        if absent:
            raise OvdenseError(f"the head's config lacks {', '.join(absent)}; export it from a model built "
                               "with a full test_cfg (configs/ovdet/)")

    @property
    def clip(self):
        return self._frozen[0]

    def features(self, inputs: torch.Tensor, with_clip_map: bool
                 ) -> tuple[tuple[torch.Tensor, ...], FrozenFeatures]:
        """``OvdenseFViT.extract_feat``: the frozen pass, the pyramid, the FPN."""
        frozen = frozen_features(self.clip, inputs, self.indices, self.method, with_clip_map=with_clip_map)
        return self.neck(self.backbone.pyramid(frozen.levels)), frozen

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, metas: Sequence[dict], text: torch.Tensor, seen: torch.Tensor,
                ensemble: bool = True, rescale: bool = True) -> list[dict[str, torch.Tensor]]:
        """Detections per image, as mmdet's ``pred_instances``.

        Args:
            inputs: normalised, padded ``[B, 3, Hp, Wp]`` (``Detector.preprocess``).
            metas: per image ``img_shape`` (resized ``(h, w)``), ``ori_shape`` ``(H, W)`` and
                ``scale_factor`` ``(w/W, h/H)``, as mmdet's.
            text: the vocabulary's text embeddings ``[C, D]``; seen: ``[C]`` bool (training classes).
            ensemble: F-ViT's CLIP term on.
        Returns:
            dicts with ``bboxes [K, 4]``, ``scores [K]``, ``labels [K]`` and, with a mask head,
            ``masks [K, H, W]`` bool (at ``ori_shape`` when ``rescale``).
        """
        x, frozen = self.features(inputs, with_clip_map=ensemble)
        proposals = self.rpn_head.predict(x, metas, self.test_cfg["rpn"])
        rcnn = self.test_cfg["rcnn"]
        head = self.roi_head.bbox_head
        rois = bbox2roi(proposals)  # R, 5
        empty = [dict(bboxes=rois.new_zeros(0, 4), scores=rois.new_zeros(0),
                      labels=torch.zeros(0, dtype=torch.long, device=rois.device)) for _ in metas]
        if rois.shape[0] == 0:
            results = empty
        else:
            feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs], rois)  # R, C, s, s
            region_clip = region_clip_embeddings(frozen.clip_map, rois, frozen.stride) if ensemble else None
            scores, deltas = head(feats, text, seen, region_clip)  # R, C+1 and R, 4
            counts = [len(p) for p in proposals]
            results = []
            for roi, score, delta, meta in zip(rois.split(counts), scores.split(counts), deltas.split(counts),
                                               metas):
                if roi.shape[0] == 0:
                    results.append(dict(empty[0]))
                    continue
                bboxes = head.bbox_coder.decode(roi[:, 1:], delta.view(-1, 4), max_shape=meta["img_shape"])
                if rescale and not self.with_mask:  # mmdet rescales here only without a mask head
                    bboxes = bboxes * bboxes.new_tensor([1 / s for s in meta["scale_factor"]]).repeat((1, 2))
                boxes, kept_scores, labels = multiclass_nms(bboxes, score, rcnn["score_thr"], rcnn["nms"],
                                                            rcnn["max_per_img"])
                results.append(dict(bboxes=boxes, scores=kept_scores, labels=labels))
        if self.with_mask:
            self._predict_masks(x, metas, results, rcnn, rescale)
        return results

    def _predict_masks(self, x, metas, results, rcnn: dict, rescale: bool) -> None:
        """``StandardRoIHead.predict_mask`` + ``FCNMaskHead.predict_by_feat``."""
        if not rescale:
            raise unsupported("masks without rescale")
        boxes = [r["bboxes"] for r in results]
        rois = bbox2roi(boxes)  # K, 5
        threshold = rcnn["mask_thr_binary"]
        if rois.shape[0] == 0:
            for r, meta in zip(results, metas):
                scale = r["bboxes"].new_tensor(meta["scale_factor"]).repeat((1, 2))
                r["bboxes"] = r["bboxes"] / scale
                r["masks"] = torch.zeros(0, *meta["ori_shape"][:2], dtype=torch.bool, device=rois.device)
            return
        feats = self.mask_roi_extractor(x[:self.mask_roi_extractor.num_inputs], rois)  # K, C, s, s
        logits = self.roi_head.mask_head(feats).split([len(b) for b in boxes])  # K, 1, 2s, 2s
        for r, mask_logits, meta in zip(results, logits, metas):
            if r["bboxes"].shape[0] == 0:
                r["masks"] = torch.zeros(0, *meta["ori_shape"][:2], dtype=torch.bool, device=rois.device)
            else:
                # paste also rescales r["bboxes"] in place, as mmdet
                r["masks"] = FCNMaskHead.paste(mask_logits, r["bboxes"], meta, threshold)


# --------------------------------------------------------------------------------------------
# The Python API

#: The trained heads shipped in ``ovdense/assets`` for the embedded toy backbones, each trained by
#: ``configs/ovdet/fvlm_toy_synthetic.py`` on the toy world's base classes (``toy-clipself``'s with
#: ``--cfg-options model.clip.name=toy-clipself``).
TOY_HEAD_FILE = "fvit-toy-head.safetensors"
TOY_HEAD_FILES = {"toy": TOY_HEAD_FILE, "toy-clipself": "fvit-toy-clipself-head.safetensors"}


def default_head_checkpoint(backbone) -> Path | None:
    """The F-ViT head that ships with ovdense for ``backbone``: ``ovdense/assets/fvit-toy-head.safetensors``
    for the toy CLIP, ``fvit-toy-clipself-head.safetensors`` for ``toy-clipself``, when the file is
    installed; ``None`` otherwise (no other backbone ships one)."""
    from ovdense.backbone.clip import ASSETS

    name = TOY_HEAD_FILES.get(backbone.name)
    if name is not None and (ASSETS / name).is_file():
        return ASSETS / name
    return None


@dataclass
class DetectionResult:
    """One image's detections, in pixels of the input image.

    Attributes:
        boxes: ``[K, 4]`` float ``(x1, y1, x2, y2)``.
        scores: ``[K]``, the ensemble's (or the detector's) probability.
        class_ids: ``[K]`` indices into ``classes``.
        masks: ``[K, H, W]`` bool, or ``None`` for a box-only (Faster R-CNN) head.
        classes: the vocabulary.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    masks: np.ndarray | None
    classes: list[str]

    OUTPUTS = ("_overlay.jpg", ".json")

    def to_json(self, **info) -> dict:
        """These detections as ``ovdense detect`` writes them: ``{"classes": [...], "detections": [...]}``,
        one entry per detection (score order) with the COCO results fields ``bbox`` ``[x, y, w, h]``
        (input-image pixels), ``category_id`` (index into ``classes``), ``score`` and, for a head
        with masks, ``segmentation`` (compressed COCO RLE, ``ovdense.data.rle``), plus ``class`` (the
        name)."""
        from ovdense.data import rle

        detections = []
        for k in range(len(self.scores)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[k])
            class_id = int(self.class_ids[k])
            entry = {"bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                     "category_id": class_id, "class": self.classes[class_id],
                     "score": round(float(self.scores[k]), 6)}
            if self.masks is not None:
                entry["segmentation"] = rle.encode(self.masks[k])
            detections.append(entry)
        return {"classes": list(self.classes), "detections": detections, **info}

    def overlay(self, image) -> np.ndarray:
        """``ovdense detect``'s picture: masks, boxes and labels on the image, RGB ``uint8 [H, W, 3]``."""
        from ovdense.io import draw_detections, load_image

        return draw_detections(load_image(image), self)

    def save(self, out_dir: str | os.PathLike, stem: str, image, /, **info) -> list[Path]:
        """Write ``<stem>_overlay.jpg`` and ``<stem>.json`` (``to_json(**info)``) in ``out_dir``, the
        JSON last (``ovdense.heads.results``)."""
        from ovdense.io import write_image, write_json

        out = Path(out_dir)
        return [write_image(out / f"{stem}_overlay.jpg", self.overlay(image)),
                write_json(out / f"{stem}.json", self.to_json(**info))]


class Detector:
    """Detect and segment any words with a trained F-ViT head on the shared backbone, in plain torch
    (``PlainFViT``: no mmcv, mmdet or mmengine needed).

    Args:
        backbone: the ``ClipBackbone`` the head was trained on (checked against the head file).
        classes: any class names; those outside the head's training vocabulary get β.
        head_checkpoint: a head written by ``ovdense.mm.detection.export_head`` /
            ``ExportFViTHeadHook``; ``None``: ``default_head_checkpoint(backbone)`` (the toy's).
        score_threshold: drop detections below this score (after mmdet's own ``score_thr``).
        image_size: the long side images are resized to (default: the backbone's ``short_side``
            default for the toy, else 640, F-ViT's OV-COCO size).
        ensemble: F-ViT's CLIP ensemble on (``False``: the detector's own scores).

    A head file that stores its class embeddings (``StoredText``: a converted published head, e.g.
    CLIM's 80 COCO classes) gives them to the classes of those names; every other class is encoded by
    the backbone's text tower with the head's templates (``vocabulary_text``). ``text_sources`` says
    which, per class (``"stored"`` or ``"encoded"``); ``stored_text`` is the file's ``StoredText`` or
    ``None``.

    Preprocessing is what the mmdet path did: the long side resized to ``image_size`` (bilinear,
    ``cv2.INTER_LINEAR``), mmdet's ``DetDataPreprocessor`` (RGB, ``(x − 255·mean) / (255·std)``,
    zero padding bottom/right to a multiple of ``2p``); boxes and masks come back in pixels of
    the input image.
    """

    def __init__(self, backbone, classes: Sequence[str], head_checkpoint: str | os.PathLike | None = None,
                 score_threshold: float = 0.3, image_size: int | None = None, ensemble: bool = True):
        if head_checkpoint is None:
            head_checkpoint = default_head_checkpoint(backbone)
            if head_checkpoint is None:
                raise OvdenseError(
                    f"no F-ViT head ships for backbone {backbone.name!r}: train one with "
                    "python tools/train.py configs/ovdet/fvlm_toy_synthetic.py (or another configs/ovdet "
                    "config) and pass its work_dirs/…/fvit_head.safetensors as head_checkpoint "
                    "(CLI --head-checkpoint)"
                )
        if not 0.0 <= score_threshold <= 1.0:
            raise OvdenseError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        if image_size is not None and (int(image_size) != image_size or image_size < 2 * backbone.patch_size):
            raise OvdenseError(f"image_size must be an integer ≥ {2 * backbone.patch_size}, got {image_size}")
        classes = check_vocabulary(classes)
        state, config = load_head(head_checkpoint, backbone)
        try:
            model = PlainFViT(backbone, config)
        except (KeyError, TypeError, ValueError) as e:
            raise OvdenseError(f"{head_checkpoint}: its config does not build an F-ViT ({type(e).__name__}: "
                               f"{e}); write heads with ovdense.mm.detection.export_head") from e
        expected = model.state_dict()
        missing, unexpected, wrong = key_mismatch(state, expected)
        if missing or unexpected or wrong:
            raise OvdenseError(f"{head_checkpoint} does not fit its own configuration: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}; "
                               "was it written by another ovdense version?")
        model.load_state_dict(state, strict=True)
        self.backbone = backbone
        self.model = model.to(backbone.device).eval()
        self.classes = classes
        self.ensemble = bool(ensemble)
        self.score_threshold = float(score_threshold)
        self.image_size = int(image_size or backbone.defaults.get("short_side", 640))
        self.stored_text = load_stored_text(head_checkpoint, backbone)
        # C, D: the head's stored row for a class of that name, the backbone's text for any other
        self.text, self.text_sources = vocabulary_text(backbone, classes, model.templates, self.stored_text)
        self.seen = seen_mask(classes, model.training_classes).to(self.text.device)  # C
        # mmdet's DetDataPreprocessor: mean/std in 0–255 units, as float32 tensors
        self.mean = torch.tensor([255 * m for m in backbone.mean]).view(-1, 1, 1)  # 3, 1, 1
        self.std = torch.tensor([255 * s for s in backbone.std]).view(-1, 1, 1)  # 3, 1, 1

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, dict]:
        """An RGB ``uint8 [H, W, 3]`` image → the network input ``[1, 3, Hp, Wp]`` and its meta."""
        import cv2

        H, W = rgb.shape[:2]
        factor = self.image_size / max(H, W)
        h, w = max(1, int(H * factor + 0.5)), max(1, int(W * factor + 0.5))
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()  # 3, h, w (RGB)
        x = (x - self.mean) / self.std
        divisor = 2 * self.backbone.patch_size
        pad_h, pad_w = -h % divisor, -w % divisor
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)[None]  # 1, 3, Hp, Wp
        meta = dict(img_shape=(h, w), ori_shape=(H, W), scale_factor=(w / W, h / H))
        return x.to(self.backbone.device), meta

    @torch.no_grad()
    def predict(self, image) -> DetectionResult:
        """Detect in one image (a path, PIL image or RGB ``uint8`` array)."""
        from ovdense.io import load_image

        x, meta = self.preprocess(load_image(image))
        pred = self.model.predict(x, [meta], self.text, self.seen, ensemble=self.ensemble)[0]
        keep = pred["scores"] >= self.score_threshold
        masks = pred["masks"][keep].cpu().numpy().astype(bool) if "masks" in pred else None
        return DetectionResult(boxes=pred["bboxes"][keep].cpu().numpy(),
                               scores=pred["scores"][keep].cpu().numpy(),
                               class_ids=pred["labels"][keep].cpu().numpy(), masks=masks,
                               classes=list(self.classes))
