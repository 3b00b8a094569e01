"""``OvdenseSegmentor``: an mmseg segmentor that runs ``ovdense.Segmenter``.

The segmentor owns the shared backbone and one ``Segmenter``; ``predict`` hands each image, as
the pipeline loaded it (RGB ``uint8`` at its original size), to ``Segmenter.predict`` and packs
the labels as ``pred_sem_seg``. The protocol — short-side resize, sliding windows, PAMR,
softmax over prompts, thresholds — is therefore exactly the core's, and the predictions are the
core's, bit for bit. The test pipeline must not resize (the ``Segmenter`` does, by
``short_side``), so the predictions come out at the original size that mmseg's ``IoUMetric``
compares with the ground truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor
from mmengine.registry import MODEL_WRAPPERS
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch import nn

from ovdense.backbone.clip import create_backbone
from ovdense.backbone.prompts import Vocabulary
from ovdense.backbone.protocols import METHOD_INFO
from ovdense.errors import OvdenseError
from ovdense.heads.training_free import Segmenter
from ovdense.registry import create_head, get_head

#: the segmentation heads besides the training-free methods that this segmentor runs
HEADS_OF_THEIR_OWN = ("cliper", "clipdinoiser")


@MODELS.register_module()
class OvdenseDataPreprocessor(BaseDataPreprocessor):
    """Moves the batch to the model's device and flips the pipeline's BGR images to RGB.

    It neither normalises, resizes, pads nor stacks: the ``Segmenter`` normalises with the
    backbone's own mean and std after its short-side resize, and images of one batch may
    differ in size. ``inputs`` stays a list of ``uint8 [3, H, W]`` tensors.
    """

    def __init__(self, bgr_to_rgb: bool = True):
        super().__init__()
        self.bgr_to_rgb = bgr_to_rgb

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = [image.flip(0) if self.bgr_to_rgb else image for image in data["inputs"]]  # 3, H, W
        return dict(inputs=inputs, data_samples=data.get("data_samples"))


@MODELS.register_module()
class OvdenseSegmentor(BaseSegmentor):
    """Any training-free method of ``ovdense.Segmenter`` as an mmseg segmentor, and the segmentation
    heads in ``HEADS_OF_THEIR_OWN`` (CLIPer; CLIP-DINOiser with its ``head_checkpoint``), built by the
    registry.

    CLIPer's class 0 is "background" (the text rows its classes compete with, never a dataset class
    unless the dataset has one): for a class list whose first class is not "background" the segmentor
    adds it in front; for a dataset without a background class (``dataset_background=False``) it maps
    the predictions back (class ``c`` → ``c − 1``; background → 255, which IoUMetric counts as a miss,
    as the official evaluation counts a background prediction).

    Args:
        backbone: ``create_backbone`` arguments: ``name`` (open_clip name, JSON config path or
            ``"toy"``), ``pretrained`` (tag, file or ``None``), optionally ``precision``,
            ``cache_dir``, ``weights_cache_dir``. The backbone is created on the CPU; the
            runner moves the model to its device.
        method: a name from ``ovdense.backbone.dense.METHODS``.
        classnames: a class file (one class per line, synonyms separated by commas, as in
            ``configs/_base_/classnames/``) or a list of class entries. Its order must be the
            dataset's class order.
        data_preprocessor: defaults to ``OvdenseDataPreprocessor``.
        dataset_background: for CLIPer, whether the dataset's class 0 is the background (default: whether
            the class list's first class is named "background").
        vfm: for a method that needs a second vision model (ProxyCLIP), ``create_vfm`` arguments:
            ``name`` (``dino_vitb8``, ...) and ``weights`` (the official file, or ``"random"``); it
            is a submodule, so the runner moves it with the backbone.
        segmenter_options: any other keyword argument of ``ovdense.Segmenter`` or of the head (``short_side``,
            ``window``, ``logit_scale``, ``bg_threshold``, ``pamr``, ...); one left out takes
            the method's official default, so a config names only what its dataset changes.
    """

    def __init__(
        self,
        backbone: Mapping,
        method: str,
        classnames: str | Sequence[str],
        data_preprocessor: Mapping | None = None,
        init_cfg: Mapping | None = None,
        vfm: Mapping | None = None,
        dataset_background: bool | None = None,
        **segmenter_options,
    ):
        if data_preprocessor is None:
            data_preprocessor = dict(type="OvdenseDataPreprocessor")
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        entry = get_head(method, "segmentation")  # an unknown name: the error lists the heads
        if not entry.training_free and method not in HEADS_OF_THEIR_OWN:
            raise OvdenseError(f"OvdenseSegmentor runs the training-free methods ({', '.join(METHOD_INFO)}) "
                               f"and {', '.join(HEADS_OF_THEIR_OWN)}; {method} is not one (SAN: OvdenseSAN "
                               "in ovdense.mm.san, CLIPSeg: OvdenseCLIPSeg in ovdense.mm.clipseg)")
        self.entry = entry
        self.vfm = None
        if vfm is not None:
            from ovdense.backbone.vfm import create_vfm

            self.vfm = create_vfm(**dict(vfm))  # before the backbone: a missing file fails fast
        self.backbone = create_backbone(**dict(backbone))
        self.method = method
        self.vocabulary = _vocabulary(classnames)
        listed = self.vocabulary.names[0] == "background"
        self.extra_background = False
        if getattr(entry.load(), "background_first", False):
            if not listed:
                self.vocabulary = Vocabulary.parse([["background"], *map(list, self.vocabulary.synonyms())])
            self.extra_background = not (listed if dataset_background is None else dataset_background)
        elif dataset_background is not None:
            raise OvdenseError(f"dataset_background is for a head whose class 0 is the background (CLIPer), "
                               f"not {method}")
        self.segmenter_options = segmenter_options  # Segmenter's keyword arguments, its defaults
        self.segmenter = self._build_segmenter()

    def _build_segmenter(self):
        if not self.entry.training_free:
            return create_head(self.method, self.backbone, self.vocabulary, **self.segmenter_options)
        return Segmenter(self.backbone, self.method, self.vocabulary, vfm=self.vfm, **self.segmenter_options)

    def _segmenter_on_device(self) -> Segmenter:
        """The ``Segmenter``, rebuilt when the runner has moved the backbone to another device
        (its text features are plain tensors; the on-disk text cache makes this cheap)."""
        if self.segmenter.text.device != self.backbone.device:
            self.segmenter = self._build_segmenter()
        return self.segmenter

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary) - int(self.extra_background)

    # ----------------------------------------------------------------------------------------

    def predict(self, inputs, data_samples: list[SegDataSample] | None = None) -> list[SegDataSample]:
        """Segment each image (``uint8 [3, H, W]`` RGB at its original size): ``pred_sem_seg``
        ``[1, H, W]`` int64 class indices in each returned sample."""
        segmenter = self._segmenter_on_device()
        if data_samples is None:
            data_samples = [SegDataSample() for _ in range(len(inputs))]
        for image, sample in zip(inputs, data_samples):
            _check_input(image, sample)
            rgb = _to_rgb(image)  # H, W, 3
            result = segmenter.predict(rgb)
            labels = torch.from_numpy(result.labels).to(image.device)  # H, W
            if self.extra_background:  # the dataset's classes back; the added background is a miss
                labels = torch.where(labels == 0, torch.full_like(labels, 255), labels - 1)
            sample.set_data({"pred_sem_seg": PixelData(data=labels[None])})
        return data_samples

    def encode_decode(self, inputs, batch_data_samples=None) -> torch.Tensor:
        """Per-prompt cosine logits ``[B, Q, H, W]`` of same-size images (the ``Segmenter``'s
        full-resolution path, PAMR included)."""
        segmenter = self._segmenter_on_device()
        if not hasattr(segmenter, "logits"):
            raise OvdenseError(f"{self.method} has no per-prompt logits; evaluate its labels (tools/test.py)")
        logits = []
        for image in inputs:
            _check_input(image, None)
            rgb = _to_rgb(image)  # H, W, 3
            logits.append(segmenter.logits(segmenter.prepare(rgb), tuple(rgb.shape[:2])))  # Q, H, W
        return torch.stack(logits)

    def _forward(self, inputs, data_samples=None) -> torch.Tensor:
        return self.encode_decode(inputs, data_samples)

    def extract_feat(self, inputs) -> list[torch.Tensor]:
        """Dense features ``[1, D, h, w]`` of each image after the ``Segmenter``'s short-side
        resize and normalisation, zero-padded at the bottom and right to a patch multiple."""
        segmenter = self._segmenter_on_device()
        if not hasattr(segmenter, "features"):
            raise OvdenseError(f"{self.method} has no dense features of its own to extract")
        p = self.backbone.patch_size
        features = []
        for image in inputs:
            x = segmenter.prepare(_to_rgb(image))  # 1, 3, H', W'
            x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
            features.append(segmenter.features(x))  # 1, D, h, w
        return features

    def loss(self, inputs, data_samples):
        raise OvdenseError(
            f"{self.method} is a training-free method: there is nothing to train; "
            "evaluate it with tools/test.py"
        )


def _vocabulary(classnames: str | Sequence[str]) -> Vocabulary:
    if isinstance(classnames, str):
        return Vocabulary.from_file(classnames)
    return Vocabulary.parse(list(classnames))


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """``uint8 [3, H, W]`` tensor → contiguous RGB ``uint8 [H, W, 3]`` array."""
    return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())


def _check_input(image: torch.Tensor, sample: SegDataSample | None) -> None:
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise OvdenseError(
            f"OvdenseSegmentor expects uint8 RGB images [3, H, W], got {image.dtype} "
            f"{tuple(image.shape)}; use data_preprocessor=dict(type='OvdenseDataPreprocessor') "
            "(the Segmenter normalises by itself)"
        )
    if sample is None:
        return
    ori, img = sample.metainfo.get("ori_shape"), sample.metainfo.get("img_shape")
    if ori is not None and img is not None and tuple(ori[:2]) != tuple(img[:2]):
        raise OvdenseError(
            f"the test pipeline resized the image from {tuple(ori[:2])} to {tuple(img[:2])}; "
            "remove Resize from it: the segmentor resizes by model.short_side itself and "
            "predicts at the original size"
        )


@MODEL_WRAPPERS.register_module()
class OvdenseInferenceWrapper(nn.Module):
    """Holds the model in a multi-process evaluation instead of ``DistributedDataParallel``.

    Inference needs no gradient synchronisation, and DDP refuses a model without trainable
    parameters (ovdense's backbone is frozen). Each process runs its share of the images (mmengine's
    ``DefaultSampler``); the metric gathers the results of all processes.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def test_step(self, data):
        return self.module.test_step(data)

    def val_step(self, data):
        return self.module.val_step(data)

    def train_step(self, data, optim_wrapper):
        raise OvdenseError("OvdenseInferenceWrapper is for evaluation only; it cannot train")
