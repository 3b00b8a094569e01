"""F-ViT (open-vocabulary Faster / Mask R-CNN on the frozen shared backbone) in mmdet 3.3's registries.

The plain-torch parts are ``ovdense.heads.fvit`` (read its docstring for the papers and the
official files followed); this module only fits them into mmdet's two-stage detector:

* ``OvdenseFViT`` (a ``TwoStageDetector``): holds the frozen ``ClipBackbone`` *outside* its
  registered modules (never in a checkpoint, an optimizer, or ``model.train()``), runs
  ``frozen_features`` once per batch, the trainable ``OvdenseFViTPyramid`` (its ``backbone``
  slot), mmdet's ``FPN``, ``RPNHead`` and the RoI head; it encodes the vocabularies with the
  backbone's ``encode_text`` (prompt ensemble, disk cache) — the training vocabulary in
  ``loss``, the test vocabulary in ``predict`` (``set_test_classes`` swaps it at any time;
  classes outside the training vocabulary get β).
* ``OvdenseFViTRoIHead`` (``StandardRoIHead``): at test time also pools each box's CLIP
  embedding from the dense map (1×1 RoIAlign, torchvision) and hands it to the box head.
* ``ThreadedRoIAlign``: the RoI extractors' mmcv ``RoIAlign`` layers, at inference on a CPU, run
  through ``ovdense.detection.ops.roi_align`` (RoIs split between threads; mmcv's CPU kernel runs on
  one core) — the same tensor bit for bit; with gradients, mmcv's own op.
* ``OvdenseFViTBBoxHead`` (``ConvFCBBoxHead``, class-agnostic regression): ``fc_cls`` maps to the
  joint space ``D``; the classifier is ``OpenVocabClassifier``; in eval mode ``forward``
  returns probabilities (F-ViT's ensemble, or the detector's own softmax when the ensemble is
  off), so ``_predict_by_feat_single`` does not softmax them again.

A head file (``export_head``, or a published CLIM detector converted by
``tools/model_converters/fvit2ovdense.py``) loads through ``OvdenseFViT(head_checkpoint=...)``, with the
class embeddings it stores. Use a class-agnostic ``FCNMaskHead`` for instance masks (Mask R-CNN).
Configs load this module with
``custom_imports = dict(imports=["ovdense.mm.detection"], allow_failed_imports=False)``; it needs full
mmcv (``mmcv.ops`` for mmdet's RoIAlign and NMS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from mmdet.models.detectors import TwoStageDetector
from mmdet.models.layers import multiclass_nms
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
from mmdet.models.task_modules.samplers import RandomSampler
from mmdet.models.utils import empty_instances
from mmdet.registry import MODELS, TASK_UTILS
from mmdet.structures.bbox import get_box_tensor, scale_boxes
from mmengine.hooks import Hook
from mmengine.model import BaseModule
from mmengine.registry import HOOKS
from mmengine.structures import InstanceData
from torch import nn

from ovdense.backbone.clip import ClipBackbone, create_backbone
from ovdense.backbone.prompts import read_classes
from ovdense.errors import OvdenseError
from ovdense.heads import fvit
from ovdense.mm.training import derive_seed, global_share, seeded_global_rng


@MODELS.register_module()
class OvdenseFViTPyramid(BaseModule):
    """The trainable simple pyramid (``heads.fvit.SimplePyramid``) in mmdet's backbone slot:
    takes the four frozen token maps, returns four maps at strides ``p/4, p/2, p, 2p``."""

    def __init__(self, width: int, norm: str = "group", num_groups: int = 32, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.pyramid = fvit.SimplePyramid(width, norm=norm, num_groups=num_groups)

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.pyramid(levels)


@MODELS.register_module()
class OvdenseFViTBBoxHead(ConvFCBBoxHead):
    """F-ViT's box head: ``ConvFCBBoxHead`` whose classifier is text embeddings.

    Args:
        embed_dim: ``D``, the backbone's joint space (the detector checks it).
        alpha, beta: ensemble exponents for seen / unseen classes (OV-COCO 0.1 / 0.8).
        vlm_temperature: CLIP's softmax temperature in the ensemble (OV-COCO B/16: 75; ``None`` in a
            config: the backbone's own learned logit scale, filled in by ``OvdenseFViT``).
        temperature, learn_temperature: the classifier's τ (50, learned).
        ensemble: at test time, combine with CLIP's region scores (F-ViT); ``False`` gives the
            detector's own probabilities (the "without the CLIP term" ablation).
        kwargs: ``ConvFCBBoxHead``'s (``num_classes`` = the training vocabulary's size).
    """

    def __init__(self, embed_dim: int, alpha: float = 0.1, beta: float = 0.8, vlm_temperature: float = 75.0,
                 temperature: float = 50.0, learn_temperature: bool = True, ensemble: bool = True, **kwargs):
        super().__init__(**kwargs)
        if not self.reg_class_agnostic:
            raise OvdenseError("OvdenseFViTBBoxHead needs reg_class_agnostic=True (boxes for any vocabulary)")
        if self.custom_cls_channels:
            raise OvdenseError("OvdenseFViTBBoxHead takes a softmax loss_cls (use_sigmoid=False)")
        self.fc_cls = nn.Linear(self.cls_last_dim, embed_dim)  # region embedding in the joint space (CLIM)
        self.classifier = fvit.OpenVocabClassifier(embed_dim, temperature, learn_temperature)
        self.alpha, self.beta, self.vlm_temperature, self.ensemble = alpha, beta, vlm_temperature, ensemble
        # the current vocabulary: set by the detector, never saved (it comes from the backbone's text tower)
        self.register_buffer("text", torch.zeros(self.num_classes, embed_dim), persistent=False)
        self.register_buffer("seen", torch.ones(self.num_classes, dtype=torch.bool), persistent=False)

    def set_vocabulary(self, text: torch.Tensor, seen: torch.Tensor) -> None:
        """``text [C, D]`` L2-normalised; ``seen [C]`` True for training-vocabulary classes."""
        self.text = text.to(self.text.device, torch.float32)
        self.seen = seen.to(self.seen.device)
        self.num_classes = int(text.shape[0])

    def forward(self, x: torch.Tensor, region_clip: torch.Tensor | None = None) -> tuple:
        """Training: logits ``[R, C+1]``; eval: probabilities ``[R, C+1]`` (ensembled with
        ``region_clip [R, D]`` when given). Background last."""
        regions, bbox_pred = super().forward(x)  # R, D (fc_cls) and R, 4
        logits = self.classifier(regions, self.text)
        if self.training:
            return logits, bbox_pred
        probabilities = torch.softmax(logits, dim=-1)
        if region_clip is not None and self.ensemble:
            columns = self.classifier.columns(self.text)  # C+1, D
            vlm = fvit.vlm_probabilities(region_clip, columns, self.vlm_temperature)
            probabilities = fvit.ensemble(probabilities, vlm, self.seen, self.alpha, self.beta)
        return probabilities, bbox_pred

    def _predict_by_feat_single(self, roi, cls_score, bbox_pred, img_meta: dict, rescale: bool = False,
                                rcnn_test_cfg=None) -> InstanceData:
        """mmdet's per-image decoding and NMS, with ``cls_score`` taken as probabilities already."""
        results = InstanceData()
        if roi.shape[0] == 0:
            return empty_instances([img_meta], roi.device, task_type="bbox", instance_results=[results],
                                   box_type=self.predict_box_type, use_box_type=False,
                                   num_classes=self.num_classes, score_per_cls=rcnn_test_cfg is None)[0]
        bboxes = self.bbox_coder.decode(roi[:, 1:], bbox_pred.view(-1, self.bbox_coder.encode_size),
                                        max_shape=img_meta["img_shape"])  # R, 4 (class-agnostic)
        if rescale and bboxes.size(0) > 0:
            bboxes = scale_boxes(bboxes, [1 / s for s in img_meta["scale_factor"]])
        bboxes = get_box_tensor(bboxes).view(roi.size(0), -1)
        if rcnn_test_cfg is None:  # augmentation test: raw boxes and scores
            results.bboxes, results.scores = bboxes, cls_score
            return results
        det_bboxes, det_labels = multiclass_nms(bboxes, cls_score, rcnn_test_cfg.score_thr, rcnn_test_cfg.nms,
                                                rcnn_test_cfg.max_per_img, box_dim=bboxes.size(-1))
        results.bboxes, results.scores, results.labels = det_bboxes[:, :-1], det_bboxes[:, -1], det_labels
        return results


@TASK_UTILS.register_module()
class SeededRandomSampler(RandomSampler):
    """mmdet's ``RandomSampler`` (RPN anchors, RoIs) drawing from the image's own seed.

    mmdet's sampler draws ``torch.randperm`` from torch's global generator, so the anchors and
    RoIs sampled for an image depend on everything drawn before in the process: a resumed run or
    another number of processes samples others. Here each image's draw runs under the global
    generators seeded from ``(seed, draw, stream)`` — the run's seed and the image's global draw
    number, which ``SeededDataset`` puts in its metainfo (``OvdenseFViT.loss`` hands them to the
    ground truth) — and ``stream`` (0 for the RPN, 1 for the RoI head, so the two stages draw
    differently). Without them (another dataset wrapper) it is mmdet's sampler unchanged.
    """

    def __init__(self, *args, stream: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = int(stream)

    def sample(self, assign_result, pred_instances, gt_instances, **kwargs):
        meta = gt_instances.metainfo
        if "draw" not in meta or "seed" not in meta:
            return super().sample(assign_result, pred_instances, gt_instances, **kwargs)
        with seeded_global_rng(derive_seed(int(meta["seed"]), 0x5A4D, self.stream, int(meta["draw"]))):
            return super().sample(assign_result, pred_instances, gt_instances, **kwargs)


@MODELS.register_module()
class OvdenseFViTRoIHead(StandardRoIHead):
    """``StandardRoIHead`` that, at test time, gives the box head each box's CLIP embedding
    (F-ViT's ``vlm_roi_extractor``): ``clip_context = (clip_map [B, D, h, w], stride)`` is set by
    ``OvdenseFViT.extract_feat`` for the batch being predicted."""

    clip_context: tuple[torch.Tensor, int] | None = None

    def bbox_loss(self, x, sampling_results) -> dict:
        """``StandardRoIHead``'s, with the classification and box losses averaged over the sampled
        RoIs of the whole global batch instead of this process's (``mm.training.global_share``)."""
        results = super().bbox_loss(x, sampling_results)
        share = global_share(sum(len(r.priors) for r in sampling_results), x[0].device)
        losses = results["loss_bbox"]
        for key in ("loss_cls", "loss_bbox"):
            if key in losses:
                losses[key] = losses[key] * share
        return results

    def mask_loss(self, x, sampling_results, bbox_feats, batch_gt_instances) -> dict:
        """``StandardRoIHead``'s, with the mask loss averaged over the positive RoIs of the whole
        global batch instead of this process's (``mm.training.global_share``)."""
        results = super().mask_loss(x, sampling_results, bbox_feats, batch_gt_instances)
        share = global_share(sum(len(r.pos_priors) for r in sampling_results), x[0].device)
        results["loss_mask"]["loss_mask"] = results["loss_mask"]["loss_mask"] * share
        return results

    def _bbox_forward(self, x, rois: torch.Tensor) -> dict:
        bbox_feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs], rois)
        if self.with_shared_head:
            bbox_feats = self.shared_head(bbox_feats)
        region_clip = None
        if not self.training and self.clip_context is not None:
            clip_map, stride = self.clip_context
            region_clip = fvit.region_clip_embeddings(clip_map, rois, stride)  # R, D
        cls_score, bbox_pred = self.bbox_head(bbox_feats, region_clip)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=bbox_feats)


class ThreadedRoIAlign(nn.Module):
    """An mmcv ``RoIAlign`` (``pool_mode="avg"``) whose forward, where no gradient is wanted, is
    ``ovdense.detection.ops.roi_align``: torchvision's kernel, which computes mmcv's CPU kernel's values
    bit for bit (the same detectron2 sampling; ``tests/test_mm_detection.py`` checks both ``aligned``
    settings), with the RoIs split between ``torch.get_num_threads()`` threads. Where a gradient flows
    (training), the wrapped mmcv layer runs as before, so training is unchanged."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.output_size = tuple(layer.output_size)
        self.spatial_scale = float(layer.spatial_scale)
        self.sampling_ratio = int(layer.sampling_ratio)
        self.aligned = bool(layer.aligned)

    @staticmethod
    def wraps(layer: nn.Module) -> bool:
        from mmcv.ops import RoIAlign

        return isinstance(layer, RoIAlign) and layer.pool_mode == "avg"

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        from ovdense.detection.ops import roi_align

        if torch.is_grad_enabled() and (input.requires_grad or rois.requires_grad):
            return self.layer(input, rois)
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


def _thread_roi_layers(roi_head: nn.Module) -> None:
    """Wrap every mmcv ``RoIAlign`` of the RoI head's extractors in ``ThreadedRoIAlign`` (no state:
    checkpoints and ``state_dict`` keys are unchanged)."""
    for name in ("bbox_roi_extractor", "mask_roi_extractor"):
        extractor = getattr(roi_head, name, None)
        layers = getattr(extractor, "roi_layers", None)
        if layers is None:
            continue
        for i, layer in enumerate(layers):
            if ThreadedRoIAlign.wraps(layer):
                layers[i] = ThreadedRoIAlign(layer)


@MODELS.register_module()
class OvdenseFViT(TwoStageDetector):
    """F-ViT on the shared frozen backbone.

    Args:
        clip: ``create_backbone`` arguments (``name``, ``pretrained``, ``precision``, …), or a
            ``ClipBackbone`` already created (``Detector`` shares its backbone this way).
        classes: the training vocabulary (list or class file); the training set's labels index it.
            Novel classes must be absent (they never enter training).
        test_classes: the vocabulary at test time (default: ``classes``); any words.
        templates: prompt templates for ``encode_text`` (default: the backbone's own, else imagenet80).
        method: the training-free last block of the dense CLIP map (``maskclip``, F-ViT's).
        indices: the four tapped blocks (default ``fvit_out_indices``).
        pyramid: ``OvdenseFViTPyramid`` options (``norm``, ``num_groups``).
        data_preprocessor: default: mmdet's ``DetDataPreprocessor`` with the backbone's mean/std,
            BGR → RGB, padding to a multiple of ``2p``.
        head_checkpoint: an F-ViT head file (``export_head``, or a published detector converted by
            ``tools/model_converters/fvit2ovdense.py``) whose weights this model takes at build and
            again after ``init_weights``; checked against the backbone (it must be the one the head was
            trained on) and against this model (the same keys and shapes, the same training vocabulary).
            Where the file stores class embeddings (``StoredText``: CLIM's 80 COCO rows), the classes of
            those names get those rows in training and testing, as in ``Detector``; every other class is
            encoded by the backbone. This is how ``tools/test.py`` runs a converted published model
            without a ``.pth``: ``--cfg-options model.head_checkpoint=HEAD model.clip.pretrained=BACKBONE``.
        neck, rpn_head, roi_head, train_cfg, test_cfg, init_cfg: as ``TwoStageDetector``.
    """

    def __init__(self, clip: Mapping, classes, neck: Mapping, rpn_head: Mapping, roi_head: Mapping,
                 train_cfg=None, test_cfg=None, test_classes=None, templates=None, method: str = "maskclip",
                 indices: Sequence[int] | None = None, pyramid: Mapping | None = None,
                 data_preprocessor: Mapping | None = None, head_checkpoint: str | Path | None = None,
                 init_cfg=None):
        # everything but the backbone, to rebuild this model from a head checkpoint (export_head)
        self_config = dict(classes=read_classes(classes),  # names, not a class file's path
                           neck=neck, rpn_head=rpn_head, roi_head=roi_head, test_cfg=test_cfg,
                           templates=templates, method=method, indices=indices, pyramid=pyramid)
        backbone = clip if isinstance(clip, ClipBackbone) else create_backbone(**dict(clip))
        if data_preprocessor is None:
            data_preprocessor = dict(type="DetDataPreprocessor", mean=[255 * m for m in backbone.mean],
                                     std=[255 * s for s in backbone.std], bgr_to_rgb=True,
                                     pad_size_divisor=2 * backbone.patch_size)
        roi_head = dict(roi_head)
        roi_head["bbox_head"] = {**roi_head["bbox_head"], "embed_dim": backbone.embed_dim}
        if roi_head["bbox_head"].get("vlm_temperature", 75.0) is None:  # the backbone's own CLIP temperature
            roi_head["bbox_head"]["vlm_temperature"] = backbone.logit_scale
        pyramid = dict(type="OvdenseFViTPyramid", width=backbone.width, **dict(pyramid or {}))
        super().__init__(backbone=pyramid,
                         neck=neck, rpn_head=rpn_head, roi_head=roi_head, train_cfg=train_cfg,
                         test_cfg=test_cfg, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self._frozen = (backbone,)  # a tuple: not a registered submodule, never in state_dict
        _thread_roi_layers(self.roi_head)
        self.head_config = _plain(self_config)
        self.method = method
        self.indices = tuple(indices) if indices is not None else fvit.fvit_out_indices(backbone.num_layers)
        if templates is None:
            templates = backbone.defaults.get("templates", "imagenet80")
        self.templates = templates
        self.classes = read_classes(classes)
        self.test_classes = read_classes(test_classes) if test_classes is not None else list(self.classes)
        bbox_head = self.roi_head.bbox_head
        if bbox_head.num_classes != len(self.classes):
            raise OvdenseError(f"bbox_head.num_classes is {bbox_head.num_classes}, the training vocabulary "
                               f"has {len(self.classes)} classes; make them equal")
        self._vocabulary: tuple[str, ...] | None = None
        self.stored_text: fvit.StoredText | None = None
        self.head_checkpoint = str(head_checkpoint) if head_checkpoint is not None else None
        self._init_background()
        self._load_head_file()

    @property
    def clip(self):
        """The frozen ``ClipBackbone`` (moved lazily to the device of the inputs)."""
        return self._frozen[0]

    def _init_background(self) -> None:
        """F-ViT initialises the learned background embedding from the text "background"."""
        with torch.no_grad():
            text = self.clip.encode_text(["background"], self.templates)[0]
            self.roi_head.bbox_head.classifier.background.copy_(text.to(self.roi_head.bbox_head.classifier.background))

    def init_weights(self) -> None:
        super().init_weights()
        self._init_background()
        self._load_head_file()

    def _load_head_file(self) -> None:
        """Take the weights (and stored text) of ``head_checkpoint``, if one was given."""
        if self.head_checkpoint is None:
            return
        path = self.head_checkpoint
        state, config = fvit.load_head(path, self.clip)  # checks the file and its backbone
        trained = read_classes(config.get("classes") or [])
        if trained != self.classes:
            raise OvdenseError(f"{path} was trained on {len(trained)} classes ({trained[:3]}…), this model's "
                               f"training vocabulary has {len(self.classes)} ({self.classes[:3]}…): set "
                               "model.classes to the head's")
        expected = self.state_dict()
        missing, unexpected, wrong = fvit.key_mismatch(state, expected)
        wrong = [f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})" for k in wrong]
        if missing or unexpected or wrong:
            raise OvdenseError(f"{path} does not fit this config's model: missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}, wrong shape {wrong[:3]} (a head converted from CLIM's "
                               "OV-COCO model runs with configs/ovdet/fvit_vitb16_ovcoco_clim.py, its "
                               "OV-LVIS model with fvit_vitb16_ovlvis_clim.py)")
        self.load_state_dict(state, strict=True)
        self.stored_text = fvit.load_stored_text(path, self.clip)
        self._vocabulary = None

    def set_test_classes(self, classes) -> None:
        """Swap the test vocabulary (any words); classes outside the training vocabulary get β."""
        self.test_classes = read_classes(classes)
        self._vocabulary = None

    def _use_vocabulary(self, classes: Sequence[str]) -> None:
        if self._vocabulary == tuple(classes):
            return
        # C, D: the head file's stored row for a class of that name, the backbone's text for any other
        text, _ = fvit.vocabulary_text(self.clip, list(classes), self.templates, self.stored_text)
        self.roi_head.bbox_head.set_vocabulary(text, fvit.seen_mask(classes, self.classes))
        if self.roi_head.with_mask:
            self.roi_head.mask_head.num_classes = len(classes)
        self._vocabulary = tuple(classes)

    def extract_feat(self, batch_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        clip = self.clip
        if clip.device != batch_inputs.device:
            clip.model.to(batch_inputs.device)
        with_map = not self.training and self.roi_head.bbox_head.ensemble
        features = fvit.frozen_features(clip, batch_inputs, self.indices, self.method, with_clip_map=with_map)
        self.roi_head.clip_context = (features.clip_map, features.stride) if with_map else None
        x = self.backbone(features.levels)
        return self.neck(x) if self.with_neck else x

    def loss(self, batch_inputs, batch_data_samples) -> dict:
        self._use_vocabulary(self.classes)
        for sample in batch_data_samples:  # SeededRandomSampler reads the image's (seed, draw) from here
            if "draw" in sample.metainfo and "gt_instances" in sample:
                meta = sample.metainfo
                sample.gt_instances.set_metainfo(dict(draw=meta["draw"], seed=meta["seed"]))
        return super().loss(batch_inputs, batch_data_samples)

    def predict(self, batch_inputs, batch_data_samples, rescale: bool = True):
        self._use_vocabulary(self.test_classes)
        try:
            return super().predict(batch_inputs, batch_data_samples, rescale=rescale)
        finally:
            self.roi_head.clip_context = None

    def _forward(self, batch_inputs, batch_data_samples=None):
        self._use_vocabulary(self.classes if self.training else self.test_classes)
        return super()._forward(batch_inputs, batch_data_samples)


def _plain(value):
    """Config values as plain JSON types (mmengine ``ConfigDict`` → ``dict``, tuples → lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Head files and the Python API


def export_head(model: OvdenseFViT, path: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write a trained ``OvdenseFViT``'s head (every registered tensor: pyramid, FPN, RPN, RoI heads;
    no backbone) with the configuration that rebuilds it, tied to its backbone
    (``heads.fvit.save_head``). ``dtype`` (``torch.float16`` or ``"float16"``) stores the
    floating tensors in that type (half the file); loading gives float32 back."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return fvit.save_head(path, model.state_dict(), model.clip, model.head_config, dtype=dtype)


@HOOKS.register_module()
class ExportFViTHeadHook(Hook):
    """After training, write ``WORK_DIR/<filename>`` with ``export_head`` (process 0 only);
    ``dtype="float16"`` halves the file (what ships in ``ovdense/assets``)."""

    def __init__(self, filename: str = "fvit_head.safetensors", dtype: str | None = None):
        if dtype not in (None, "float16", "bfloat16", "float32"):
            raise OvdenseError(f"ExportFViTHeadHook dtype: float16, bfloat16 or float32, not {dtype!r}")
        self.filename = filename
        self.dtype = dtype

    def after_train(self, runner) -> None:
        from mmengine.dist import is_main_process
        from mmengine.model import is_model_wrapper

        if is_main_process():
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            path = export_head(model, Path(runner.work_dir) / self.filename, dtype=self.dtype)
            runner.logger.info(f"F-ViT head written to {path}")


# the Python API lives in the core (plain torch); re-exported for older imports
Detector = fvit.Detector
DetectionResult = fvit.DetectionResult
