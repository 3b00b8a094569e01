"""``OvdenseSAN``: SAN (Xu et al., CVPR 2023) as an mmseg segmentor that trains on mmengine.

The segmentor holds three things:

* the frozen backbone (``ovdense.create_backbone``), *outside* its registered modules: it is
  never in ``state_dict()``, an optimizer or a checkpoint, and follows the segmentor's
  ``.to(device)``/``.cuda()``/``.half()`` (``_apply``);
* ``head``, the ``ovdense.heads.san.SanHead`` — everything SAN trains;
* ``criterion``, the ``ovdense.train.criterion.SanCriterion``.

The text embeddings of the training vocabulary (``classnames``, a class file) are computed once
per device (``backbone.encode_text``, on-disk cache); a class with synonyms gets the normalised
mean of its synonyms' embeddings.

Training (``loss``): images arrive normalised with the backbone's own mean and std and padded
to the crop size (``SanDataPreprocessor``). The targets of each image are one binary mask per
class present in ``gt_sem_seg`` (label 255 excluded), as the official
``MaskFormerSemanticDatasetMapper``. The criterion runs once per image, with a point-sampling
``torch.Generator`` seeded from ``(seed, draw)`` — the run's seed and the image's global sample
index, which ``ovdense.mm.training.SeededDataset`` records — and with ``num_masks`` the number
of target masks of the global batch divided by the number of processes (the official
all-reduced mean). The per-image mask and dice terms (each already divided by ``num_masks``)
are summed; the per-image class terms are averaged.

Where this departs from the official ``SetCriterion`` call: the official loss takes one
cross-entropy mean over all queries of a process's batch (weights 1 / 0.1), and draws the
points of all images from one global generator. Per-image class means and per-image generators
make a step's update independent of how the global batch is split over processes (two
processes with one image each train to the weights of one process with two images, up to
float rounding) and of the kill/resume history. Everything else is the official recipe.

Inference (``predict``): each image, RGB ``uint8`` at its original size as the test pipeline
loaded it, goes through ``SanSegmenter.class_scores`` over this model's head — the official
protocol (short side ``short_side``, long side capped at 2560, zero-padded to /32, one
whole-image pass, scores resized to the original size) — and the argmax is the label map that
mmseg's ``IoUMetric`` and ``tools/test.py`` compare with the original ground truth. Training
uses one embedding per class (synonyms averaged); inference, ``SanSegmenter``'s max over
synonyms.

A loss that is not finite stops training with an ``OvdenseError`` naming the iteration
(checked on every process, so none waits forever at the next gradient all-reduce).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.logging import MessageHub
from mmengine.model import BaseDataPreprocessor
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from ovdense.backbone.clip import ClipBackbone, create_backbone
from ovdense.backbone.prompts import Vocabulary
from ovdense.errors import OvdenseError
from ovdense.heads import san as san_head
from ovdense.mm.training import derive_seed
from ovdense.train.criterion import SanCriterion, SanTarget

IGNORE_INDEX = 255


@MODELS.register_module()
class SanDataPreprocessor(BaseDataPreprocessor):
    """Batches for ``OvdenseSAN``.

    Training: BGR → RGB, normalise with ``mean``/``std`` (0–255 scale; ``OvdenseSAN`` fills in
    its backbone's), zero-pad every image at the bottom and right to the batch's largest size
    rounded up to ``size_divisor`` (the official crop size, 640), pad ``gt_sem_seg`` with 255,
    stack: ``inputs`` ``[B, 3, H, W]`` float32.

    Inference: BGR → RGB only; ``inputs`` stays a list of ``uint8 [3, H, W]`` tensors at their
    original sizes (``OvdenseSAN.predict`` resizes, normalises and pads by itself).
    """

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 size_divisor: int = 32, bgr_to_rgb: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.size_divisor = int(size_divisor)
        self.bgr_to_rgb = bgr_to_rgb

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """``(image − mean) / std`` of one image ``[3, h, w]`` already in RGB order (float32)."""
        return (image.float() - self.mean) / self.std

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        images = [image.flip(0) if self.bgr_to_rgb else image for image in data["inputs"]]  # 3, H, W
        samples = data.get("data_samples")
        if not training:
            return dict(inputs=images, data_samples=samples)
        d = self.size_divisor
        height = -(-max(image.shape[-2] for image in images) // d) * d
        width = -(-max(image.shape[-1] for image in images) // d) * d
        batch = []
        for i, image in enumerate(images):
            x = self.normalise(image)  # 3, h, w
            pad = (0, width - x.shape[-1], 0, height - x.shape[-2])
            batch.append(F.pad(x, pad, value=0.0))  # 3, H, W
            if samples is not None and "gt_sem_seg" in samples[i]:
                gt = samples[i].gt_sem_seg.data  # 1, h, w
                samples[i].gt_sem_seg = PixelData(data=F.pad(gt, pad, value=IGNORE_INDEX))  # 1, H, W
                samples[i].set_metainfo(dict(pad_shape=(height, width)))
        return dict(inputs=torch.stack(batch), data_samples=samples)  # B, 3, H, W


class FrozenBackboneSegmentor(BaseSegmentor):
    """An mmseg segmentor around ovdense's frozen backbone (SAN, CLIPSeg): the backbone is kept
    outside the registered modules (``keep_backbone``), so it is never in ``state_dict()``, an
    optimizer or a checkpoint, and follows the segmentor's ``.to()``/``.cuda()``/``.half()``;
    ``predict`` segments ``test_vocabulary``."""

    def keep_backbone(self, clip: ClipBackbone) -> None:
        object.__setattr__(self, "_backbone", clip)  # not a submodule: never trained or saved

    @property
    def backbone(self) -> ClipBackbone:
        return self._backbone

    @property
    def num_classes(self) -> int:
        """The number of classes ``predict`` segments (the test vocabulary)."""
        return len(self.test_vocabulary)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._backbone._apply(fn)
        return self


@MODELS.register_module()
class OvdenseSAN(FrozenBackboneSegmentor):
    """SAN on ovdense's shared backbone (see the module docstring).

    Args:
        backbone: ``create_backbone`` arguments (``name``, ``pretrained``, ...).
        classnames: the training vocabulary: a class file or a list of class entries, in the
            training dataset's label order.
        test_classnames: the vocabulary ``predict`` segments with, in the evaluation
            dataset's label order (open vocabulary: any names); None: ``classnames``.
        head: ``SanConfig`` fields that differ from its defaults (the official ViT-B/16 ones;
            the depths and fusion map follow from the backbone where not given).
        criterion: ``SanCriterion`` keyword arguments other than ``num_classes``.
        head_checkpoint: a head written by ``ovdense.heads.san.save_head`` (trained or
            converted weights) instead of a new head; then ``head`` must be left empty.
        templates: prompt templates for the class names; None: ``SanSegmenter``'s default
            (the backbone's own, else ViLD's).
        short_side: the inference short side; None: ``SanSegmenter``'s default (640, or the
            backbone's own).
        data_preprocessor: defaults to ``SanDataPreprocessor`` with the backbone's mean/std.
    """

    def __init__(
        self,
        backbone: Mapping,
        classnames: str | Sequence[str],
        test_classnames: str | Sequence[str] | None = None,
        head: Mapping | None = None,
        criterion: Mapping | None = None,
        head_checkpoint: str | None = None,
        templates=None,
        short_side: int | None = None,
        data_preprocessor: Mapping | None = None,
        train_cfg: Mapping | None = None,
        test_cfg: Mapping | None = None,
        init_cfg: Mapping | None = None,
    ):
        clip = create_backbone(**dict(backbone))
        preprocessor = dict(type="SanDataPreprocessor")
        preprocessor.update(data_preprocessor or {})
        preprocessor.setdefault("mean", [255.0 * m for m in clip.mean])
        preprocessor.setdefault("std", [255.0 * s for s in clip.std])
        super().__init__(data_preprocessor=preprocessor, init_cfg=init_cfg)
        self.keep_backbone(clip)
        self.vocabulary = _vocabulary(classnames)
        self.test_vocabulary = self.vocabulary if test_classnames is None else _vocabulary(test_classnames)
        self.templates = templates if templates is not None else _default_templates(clip)
        if head_checkpoint is not None:
            if head:
                raise OvdenseError("give model.head (a new head's SanConfig) or model.head_checkpoint, "
                                   "not both")
            self.head = san_head.load_head(head_checkpoint, clip)
        else:
            self.head = san_head.SanHead(clip, san_head.SanConfig(**dict(head or {})))
        self.criterion = SanCriterion(len(self.vocabulary), **dict(criterion or {}))
        self.short_side = short_side
        self.train_cfg = dict(train_cfg or {})
        self.test_cfg = dict(test_cfg or {})
        self._text: torch.Tensor | None = None
        self._segmenter: san_head.SanSegmenter | None = None

    def text_embeddings(self) -> torch.Tensor:
        """``[C, D]`` L2-normalised class embeddings on the backbone's device, computed once
        per device (a class's synonyms averaged, then renormalised)."""
        if self._text is None or self._text.device != self.backbone.device:
            words = [w for synonyms in self.vocabulary.synonyms() for w in synonyms]
            embedded = self.backbone.encode_text(words, self.templates)  # W, D
            rows, start = [], 0
            for synonyms in self.vocabulary.synonyms():
                rows.append(embedded[start:start + len(synonyms)].mean(0))
                start += len(synonyms)
            self._text = F.normalize(torch.stack(rows), dim=-1)  # C, D
        return self._text

    # ----------------------------------------------------------------------------------------
    # Training

    def loss(self, inputs: torch.Tensor, data_samples: list[SegDataSample]) -> dict[str, torch.Tensor]:
        """The SAN losses of a batch (``inputs`` ``[B, 3, H, W]`` normalised and padded)."""
        outputs = self.head(self.backbone, inputs, self.text_embeddings())  # deepest last
        targets = [self._target(sample, inputs.shape[-2:]) for sample in data_samples]
        num_masks = torch.tensor(float(sum(len(t.labels) for t in targets)), device=inputs.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        num_masks = max(float(num_masks), 1.0)
        total: dict[str, torch.Tensor] = {}
        for b, (sample, target) in enumerate(zip(data_samples, targets)):
            generator = torch.Generator().manual_seed(_sample_seed(sample))
            single = [_slice_output(o, b) for o in outputs]
            losses = self.criterion(single, [target], generator=generator, num_masks=num_masks)
            for name, value in losses.items():
                share = value / len(targets) if name.endswith("loss_cls") else value
                total[name] = total[name] + share if name in total else share
        return total

    def _target(self, sample: SegDataSample, size) -> SanTarget:
        gt = sample.gt_sem_seg.data[0]  # H, W
        if tuple(gt.shape) != tuple(size):
            raise OvdenseError(
                f"gt_sem_seg is {tuple(gt.shape)} but the batch is {tuple(size)}: "
                "use data_preprocessor=dict(type='SanDataPreprocessor')"
            )
        classes = torch.unique(gt)
        classes = classes[classes != IGNORE_INDEX]  # K
        if classes.numel() and int(classes.max()) >= len(self.vocabulary):
            raise OvdenseError(
                f"the ground truth has label {int(classes.max())} but the training vocabulary has "
                f"{len(self.vocabulary)} classes: the class file must list every training class in label "
                "order (and label 255 marks ignored pixels)"
            )
        masks = gt[None] == classes[:, None, None]  # K, H, W
        return SanTarget(labels=classes.long(), masks=masks)

    def parse_losses(self, losses: dict[str, torch.Tensor]):
        loss, log_vars = super().parse_losses(losses)
        finite = torch.isfinite(loss.detach()).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            hub = MessageHub.get_current_instance()
            iteration = int(hub.get_info("iter", -1)) + 1
            terms = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in log_vars.items())
            raise OvdenseError(
                f"the training loss is not finite at iteration {iteration} ({terms}); "
                "lower the learning rate or check the data, then resume from the last checkpoint "
                "with --resume"
            )
        return loss, log_vars

    # ----------------------------------------------------------------------------------------
    # Inference

    def segmenter(self) -> san_head.SanSegmenter:
        """The ``SanSegmenter`` over this model's head and vocabulary (rebuilt when the runner
        has moved the model to another device)."""
        if self._segmenter is None or self._segmenter.text.device != self.backbone.device:
            self._segmenter = san_head.SanSegmenter(
                self.backbone, self.test_vocabulary, head=self.head, templates=self.templates,
                short_side=self.short_side,
            )
        return self._segmenter

    def encode_decode(self, inputs, batch_img_metas=None) -> torch.Tensor:
        """Semantic scores ``[B, C, H, W]`` of same-size ``uint8 [3, H, W]`` RGB images."""
        segmenter = self.segmenter()
        return torch.stack([segmenter.class_scores(_to_rgb(image)) for image in inputs])

    def predict(self, inputs, data_samples: list[SegDataSample] | None = None) -> list[SegDataSample]:
        """``pred_sem_seg`` ``[1, H, W]`` and ``seg_logits`` ``[C, H, W]`` at each image's
        original size (``SanSegmenter.class_scores``: the official inference protocol)."""
        segmenter = self.segmenter()
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(len(inputs))]
        for image, sample in zip(inputs, data_samples):
            _check_input(image, sample)
            scores = segmenter.class_scores(_to_rgb(image)).to(image.device)  # C, H, W
            sample.set_data({
                "seg_logits": PixelData(data=scores),
                "pred_sem_seg": PixelData(data=scores.argmax(0, keepdim=True)),  # 1, H, W
            })
        self.head.train(self.training)  # SanSegmenter put the head in eval mode
        return data_samples

    def _forward(self, inputs, data_samples=None):
        """The head's outputs on a training batch (``inputs`` ``[B, 3, H, W]`` normalised)."""
        return self.head(self.backbone, inputs, self.text_embeddings())

    def extract_feat(self, inputs):
        return self._forward(inputs)


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """``uint8 [3, H, W]`` tensor → contiguous RGB ``uint8 [H, W, 3]`` array."""
    return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())


def _check_input(image: torch.Tensor, sample: SegDataSample | None, model: str = "OvdenseSAN") -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise OvdenseError(
            f"{model} predicts on uint8 RGB images [3, H, W], got {image.dtype} {tuple(image.shape)}; "
            "use data_preprocessor=dict(type='SanDataPreprocessor')"
        )
    ori, img = sample.metainfo.get("ori_shape"), sample.metainfo.get("img_shape")
    if ori is not None and img is not None and tuple(ori[:2]) != tuple(img[:2]):
        raise OvdenseError(
            f"the test pipeline resized the image from {tuple(ori[:2])} to {tuple(img[:2])}; "
            f"remove Resize from it: {model} resizes the image itself"
        )


def _vocabulary(classnames: str | Sequence[str]) -> Vocabulary:
    if isinstance(classnames, str):
        return Vocabulary.from_file(classnames)
    return Vocabulary.parse(list(classnames))


def _default_templates(backbone: ClipBackbone):
    """The templates ``SanSegmenter`` defaults to: the backbone's own (the toy model) or ViLD's."""
    return backbone.defaults.get("templates", list(san_head.VILD_TEMPLATES))


def _sample_seed(sample: SegDataSample) -> int:
    """The point-sampling seed of one training image: from ``(seed, draw)`` that
    ``SeededDataset`` records, else from the image's path (a dataset used without it)."""
    meta = sample.metainfo
    if "draw" in meta:
        return derive_seed(int(meta.get("seed", 0)), 0x5A11, int(meta["draw"]))
    path = str(meta.get("img_path", ""))
    return derive_seed(0x5A11, *path.encode()[-32:])


def _slice_output(output, b: int):
    """Image ``b`` of a batched head output, as a batch of one."""
    fields = dict(mask_logits=output.mask_logits[b:b + 1], class_logits=output.class_logits[b:b + 1])
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **fields)
    return output._replace(**fields)
