"""The OpenMMLab adapter: ovdense's heads and the benchmarks' datasets in mmseg's registries.

Importing ``ovdense.mm`` registers, in mmsegmentation 1.x's registries (``default_scope="mmseg"``):

* ``MODELS``: ``OvdenseSegmentor`` (any training-free method of ``ovdense.Segmenter`` on the
  shared backbone) and ``OvdenseDataPreprocessor`` (BGR → RGB only; the ``Segmenter``
  resizes and normalises itself); ``OvdenseSAN`` (the trained SAN head, ``ovdense/mm/san.py``)
  and ``SanDataPreprocessor``; ``OvdenseCLIPSeg`` (CLIPSeg's decoder, ``ovdense/mm/clipseg.py``);
  mmengine's ``MODELS`` / ``DATASETS`` / ``HOOKS``: ``OvdenseCLIPSelf``, ``ClipSelfDataset`` and
  ``ExportClipSelfHook`` (CLIPSelf's refinement of the backbone, ``ovdense/mm/clipself.py``);
  ``OvdenseAdaptClip``, ``AnomalyPairDataset`` and ``ExportAdaptClipHook`` (AdaptCLIP's anomaly adapters,
  ``ovdense/mm/adaptclip.py``);
* ``DATASETS``: ``PascalVOC20Dataset``, ``COCOObjectDataset``, ``PascalContext459Dataset`` and
  ``ADE20K847Dataset``, the benchmarks mmseg 1.2.2 lacks; ``ClassFileDataset`` (any dataset in
  the images/annotations layout with a class file); ``ClipSegPromptDataset`` (CLIPSeg's
  prompted training pairs from any of them);
* ``TRANSFORMS``: ``LoadAnnotations16`` (label maps with more than 255 classes);
* ``METRICS``: ``IoUMetric16`` (mmseg's ``IoUMetric`` writing 16-bit ``--out`` PNGs);
* mmengine's ``MODEL_WRAPPERS``: ``OvdenseInferenceWrapper`` (multi-process evaluation of a
  frozen model, which ``DistributedDataParallel`` refuses);
* mmengine's training registries (``ovdense/mm/training.py``): ``SeededInfiniteSampler``,
  ``SeededDataset``, ``SeededIterBasedTrainLoop`` (exact resume), ``AtomicCheckpointHook``,
  ``LossCurveHook``, ``ProgressBarHook``.

Configs load it with ``custom_imports = dict(imports=["ovdense.mm"])``. It needs full mmcv 2.1
(with ``mmcv.ops``; ``python tools/misc/build_mmcv.py``), mmengine 0.10 and mmsegmentation 1.2.2
(``pip install -e ".[mm]"``). Nothing else in ovdense imports this package.
"""

import ovdense.mm.adaptclip  # noqa: F401 - registers OvdenseAdaptClip, AnomalyPairDataset, ExportAdaptClipHook
import ovdense.mm.clipdinoiser  # noqa: F401 - registers OvdenseClipDinoiser, its dataset and hook
from ovdense.mm.clipseg import ClipSegPromptDataset, OvdenseCLIPSeg
from ovdense.mm.clipself import ClipSelfDataset, ExportClipSelfHook, OvdenseCLIPSelf
from ovdense.mm.custom import ClassFileDataset
from ovdense.mm.datasets import (
    ADE20K847Dataset,
    COCOObjectDataset,
    IoUMetric16,
    LoadAnnotations16,
    PascalContext459Dataset,
    PascalVOC20Dataset,
)
from ovdense.mm.phrasecut import LoadPhraseMask, PhraseCutDataset, PhraseGroundingMetric  # noqa: F401
from ovdense.mm.san import OvdenseSAN, SanDataPreprocessor
from ovdense.mm.segmentor import OvdenseDataPreprocessor, OvdenseInferenceWrapper, OvdenseSegmentor
from ovdense.mm.training import (
    AtomicCheckpointHook,
    LossCurveHook,
    ProgressBarHook,
    SeededDataset,
    SeededInfiniteSampler,
    SeededIterBasedTrainLoop,
)

__all__ = [
    "ADE20K847Dataset",
    "AtomicCheckpointHook",
    "ClassFileDataset",
    "ClipSegPromptDataset",
    "ClipSelfDataset",
    "ExportClipSelfHook",
    "LossCurveHook",
    "OvdenseCLIPSeg",
    "OvdenseCLIPSelf",
    "OvdenseSAN",
    "ProgressBarHook",
    "SanDataPreprocessor",
    "SeededDataset",
    "SeededInfiniteSampler",
    "SeededIterBasedTrainLoop",
    "COCOObjectDataset",
    "IoUMetric16",
    "LoadAnnotations16",
    "OvdenseDataPreprocessor",
    "OvdenseInferenceWrapper",
    "OvdenseSegmentor",
    "PascalContext459Dataset",
    "PascalVOC20Dataset",
]
