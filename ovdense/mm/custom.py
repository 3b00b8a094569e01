"""``ClassFileDataset``: any semantic-segmentation dataset in the standard two-folder layout.

    data_root/
      images/<split>/<name><img_suffix>          (e.g. .jpg)
      annotations/<split>/<name><seg_map_suffix>  (8-bit PNG label maps: 0 … C−1, 255 ignored)

with a class file (one class per line, synonyms after commas, in label order). The same class
file is the model's vocabulary (``model.classnames``), so names and labels cannot drift apart.
With ``reduce_zero_label=True`` label 0 is ignored and ``k`` becomes ``k − 1`` (ADE20K's
convention); the class file then lists the classes of labels 1, 2, …
"""

from __future__ import annotations

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from ovdense.backbone.prompts import Vocabulary


@DATASETS.register_module()
class ClassFileDataset(BaseSegDataset):
    """A segmentation dataset whose classes come from a class file.

    Args:
        classnames: the class file (``configs/_base_/classnames/*.txt`` format).
        img_suffix, seg_map_suffix: file endings of images and label maps.
        reduce_zero_label: ignore label 0 and shift the others down by one.
        kwargs: ``BaseSegDataset``'s (``data_root``, ``data_prefix``, ``pipeline``, ``ann_file``…).
    """

    METAINFO: dict = dict()

    def __init__(self, classnames: str, img_suffix: str = ".jpg", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = False, metainfo: dict | None = None, **kwargs) -> None:
        names = Vocabulary.from_file(classnames).names
        super().__init__(metainfo=dict(metainfo or {}, classes=names), img_suffix=img_suffix,
                         seg_map_suffix=seg_map_suffix, reduce_zero_label=reduce_zero_label, **kwargs)
