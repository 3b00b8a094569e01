"""The benchmark datasets mmseg 1.2.2 lacks, and a loader for label maps beyond 255 classes.

* ``PascalVOC20Dataset`` — PASCAL VOC 2012 val without its background class (VOC20): VOC's own
  files; label 0 and the void band are ignored, class ``k`` becomes ``k − 1``.
* ``COCOObjectDataset`` — COCO-Object: background + COCO's 80 thing classes, from per-image
  ``<id>_instanceTrainIds.png`` label maps (``tools/data/dataset_converters/coco_object.py``).
* ``PascalContext459Dataset`` and ``ADE20K847Dataset`` — the full vocabularies, with 16-bit
  label maps (``0 … C−1``, ``65535`` ignored; load them with ``LoadAnnotations16`` and score them
  with ``IoUMetric16``); their class names come from a class file, the same one the model reads.

VOC21, Context60 (``PascalContextDataset``), Context59 (``PascalContextDataset59``),
COCO-Stuff-171 (``COCOStuffDataset``), Cityscapes and ADE20K-150 are mmseg's own classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import mmcv
import numpy as np
from mmengine import fileio
from mmseg.datasets import BaseSegDataset, COCOStuffDataset, PascalVOCDataset
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.evaluation import IoUMetric
from mmseg.registry import DATASETS, METRICS, TRANSFORMS

from ovdense.backbone.prompts import Vocabulary
from ovdense.io import write_bytes

IGNORE_16 = 65535


@DATASETS.register_module()
class PascalVOC20Dataset(BaseSegDataset):
    """PASCAL VOC 2012 without background: 20 classes, ``reduce_zero_label=True``."""

    METAINFO = dict(
        classes=PascalVOCDataset.METAINFO["classes"][1:],
        palette=PascalVOCDataset.METAINFO["palette"][1:],
    )

    def __init__(self, ann_file: str, img_suffix: str = ".jpg", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = True, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, ann_file=ann_file,
                         reduce_zero_label=reduce_zero_label, **kwargs)


@DATASETS.register_module()
class COCOObjectDataset(BaseSegDataset):
    """COCO-Object: class 0 background, 1–80 COCO's thing classes in category-id order (the
    first 80 classes of COCO-Stuff-171)."""

    METAINFO = dict(
        classes=("background",) + tuple(COCOStuffDataset.METAINFO["classes"][:80]),
        palette=[[0, 0, 0]] + list(COCOStuffDataset.METAINFO["palette"][:80]),
    )

    def __init__(self, img_suffix: str = ".jpg", seg_map_suffix: str = "_instanceTrainIds.png",
                 reduce_zero_label: bool = False, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)


class _ClassesFromFile(BaseSegDataset):
    """A dataset whose class names are read from a class file (first synonym of each line)."""

    METAINFO: dict = dict()

    def __init__(self, classnames: str, metainfo: dict | None = None, **kwargs) -> None:
        names = Vocabulary.from_file(classnames).names
        super().__init__(metainfo=dict(metainfo or {}, classes=names), **kwargs)


@DATASETS.register_module()
class PascalContext459Dataset(_ClassesFromFile):
    """PASCAL Context with all 459 classes: 16-bit ``SegmentationClassContext459/*.png``
    (``tools/data/dataset_converters/pascal_context.py --full``), ``65535`` = unlabelled."""

    def __init__(self, classnames: str, ann_file: str, img_suffix: str = ".jpg",
                 seg_map_suffix: str = ".png", **kwargs) -> None:
        super().__init__(classnames, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         ann_file=ann_file, reduce_zero_label=False, **kwargs)


@DATASETS.register_module()
class ADE20K847Dataset(_ClassesFromFile):
    """ADE20K-Full with 847 classes in the layout of detectron2's ``prepare_ade20k_full.py``
    (``images_detectron2/validation/*.jpg``, 16-bit ``annotations_detectron2/validation/*.tif``,
    ``65535`` = unlabelled)."""

    def __init__(self, classnames: str, img_suffix: str = ".jpg", seg_map_suffix: str = ".tif",
                 **kwargs) -> None:
        super().__init__(classnames, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=False, **kwargs)


@TRANSFORMS.register_module()
class LoadAnnotations16(LoadAnnotations):
    """mmseg's ``LoadAnnotations`` without its cast to ``uint8``: label maps keep 16 bits, so
    classes beyond 254 survive. With ``reduce_zero_label``, 0 becomes ``ignore_index`` and
    ``k`` becomes ``k − 1``. Score them with ``IoUMetric16(ignore_index=65535)``."""

    def __init__(self, ignore_index: int = IGNORE_16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index

    def _load_seg_map(self, results: dict) -> None:
        data = fileio.get(results["seg_map_path"], backend_args=self.backend_args)
        seg = mmcv.imfrombytes(data, flag="unchanged", backend=self.imdecode_backend).squeeze()
        seg = seg.astype(np.int64)  # H, W
        if self.reduce_zero_label is None:
            self.reduce_zero_label = results["reduce_zero_label"]
        if self.reduce_zero_label:
            ignored = (seg == 0) | (seg == self.ignore_index)
            seg = np.where(ignored, self.ignore_index, seg - 1)
        if results.get("label_map") is not None:
            original = seg.copy()
            for old_id, new_id in results["label_map"].items():
                seg[original == old_id] = new_id
        results["gt_seg_map"] = seg
        results["seg_fields"].append("gt_seg_map")


@METRICS.register_module()
class IoUMetric16(IoUMetric):
    """mmseg's ``IoUMetric`` (same scores) whose ``output_dir`` PNGs are 16-bit grayscale: mmseg's
    own casts each prediction to ``uint8``, so with more than 256 classes (PC-459, ADE20K-847) a
    predicted 390 was saved as 134. Each file is written atomically (``ovdense.io.write_bytes``);
    ``+1`` for datasets that reduce the zero label, as mmseg's."""

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        output_dir, self.output_dir = self.output_dir, None  # the scores: mmseg's own code
        try:
            super().process(data_batch, data_samples)
        finally:
            self.output_dir = output_dir
        if output_dir is None:
            return
        for sample in data_samples:
            labels = sample["pred_sem_seg"]["data"].squeeze().cpu().numpy().astype(np.int64)  # H, W
            if sample.get("reduce_zero_label", False):
                labels = labels + 1
            name = os.path.splitext(os.path.basename(sample["img_path"]))[0] + ".png"
            ok, encoded = cv2.imencode(".png", labels.astype(np.uint16))
            write_bytes(os.path.join(os.path.abspath(output_dir), name), encoded.tobytes())
