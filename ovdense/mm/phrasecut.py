"""PhraseCut (Wu et al., CVPR 2020), the phrase-grounding data CLIPSeg trains and is scored on:
``PhraseCutDataset`` (one item per phrase–region task), ``LoadPhraseMask`` (the task's polygons as
a binary label map) and ``PhraseGroundingMetric`` (mIoU, IoU_FG and AP as CLIPSeg's paper reports
them).

PhraseCut's own layout (ChenyunWu/PhraseCutDataset ``utils/file_paths.py``, written by its
``download_dataset.py``; the README's "Annotation data structure")::

    VGPhraseCut_v0/
      image_data_split.json   [{"image_id", "width", "height", "split", "coco_id", "flickr_id", "url"}, …]
      refer_<split>.json      [task, …] for split in train, val, test, miniv
      images/<image_id>.jpg

A task is one phrase and its region: ``task_id`` (``"<image_id>__<ann_id>_<ann_id>…"``),
``image_id``, ``ann_ids``, ``phrase``, ``phrase_structure``, ``instance_boxes`` (``[x, y, w, h]``
each) and ``Polygons``: one list per instance, of polygons, each a list of ``[x, y]`` points
(x the column, y the row).

Test-time contract with ``OvdenseCLIPSeg.predict`` (``ovdense/mm/clipseg.py``): the test pipeline
packs ``phrase`` into each sample's metainfo (``PackSegInputs(meta_keys=…)``, see
``configs/clipseg/clipseg_vit-b16_phrasecut.py``); the segmentor answers with ``seg_logits``
``[1, H, W]``, the phrase's probability at the image's size, which the metric reads with
``gt_sem_seg`` (1 the region, 0 the rest). Training: ``ClipSegPromptDataset`` reads
``metainfo["classes"]`` (class id → phrase), ``images_of_class()`` and each sample's
``label_classes`` (``[0, phrase_id]``: label 1 is the phrase).
"""

from __future__ import annotations

import json
import os.path as osp
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmcv.transforms import BaseTransform
from mmengine.evaluator import BaseMetric
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS, METRICS, TRANSFORMS
from PIL import Image, ImageDraw

from ovdense.errors import OvdenseError

IGNORE_INDEX = 255

# Images whose annotated size is not their real size, which the official CLIPSeg loader leaves out
# of every split (timojl/clipseg datasets/phrasecut.py, PhraseCut.__init__, ``invalid_img_ids``).
CLIPSEG_SKIPPED_IMAGES = frozenset({
    150417, 285665, 498246, 61564, 285743, 498269, 498010, 150516, 150344, 286093, 61530, 150333,
    286065, 285814, 498187, 285761, 498042,
})

# The score thresholds of CLIPSeg's FixedIntervalMetrics (metrics.py, n_values=51): 0.02, 0.04, …,
# 0.98 — np.linspace(0, 1, 51) without its ends.
THRESHOLDS = np.linspace(0, 1, 51)[1:-1]


# --------------------------------------------------------------------------------------------
# The dataset


@DATASETS.register_module()
class PhraseCutDataset(BaseSegDataset):
    """PhraseCut's tasks of a split, one item per (image, phrase) task.

    Reading follows PhraseCut's ``utils/refvg_loader.py`` (``RefVGLoader.__init__``): ``split`` may
    join several with ``_`` (``"val_miniv"``, the whole validation set); the image records of
    ``image_data_split.json`` are those whose ``split`` is one of them; the tasks of each
    ``refer_<split>.json`` are grouped by image in the order the images first appear, each image's
    tasks in file order (``get_img_ref_data``: its ``phrases`` and ``gt_Polygons``). The items are
    CLIPSeg's ``sample_ids`` (timojl/clipseg ``datasets/phrasecut.py``, ``PhraseCut.__init__``):
    one per task, images of ``skip_image_ids`` left out. Departure: ``RefVGLoader`` shuffles its
    image order (``random.shuffle``, unseeded); here the order is the file's — a sampler shuffles
    for training, and the metric does not depend on the order.

    ``metainfo["classes"]`` is ``("background", *the split's unique phrases, sorted)``, so a
    phrase's class id is ≥ 1. An item's data info holds ``img_path``, ``task_id``, ``image_id``,
    ``phrase``, ``phrase_id`` (its class id), ``polygons`` (the task's ``Polygons``) and the
    annotated ``height`` and ``width``; ``LoadPhraseMask`` draws its label map.

    Args:
        split: ``"train"``, ``"val"``, ``"test"``, ``"miniv"`` or several joined by ``_``.
        data_root: the ``VGPhraseCut_v0`` folder.
        data_prefix: ``img_path``: the images' folder under ``data_root`` (``images``).
        image_info: the image records, relative to ``data_root``.
        refer_file: the tasks of a split, ``{}`` replaced by the split's name.
        skip_image_ids: images to leave out (default: the official CLIPSeg loader's 17).
        img_suffix: the images' file ending.
        kwargs: ``BaseSegDataset``'s (``pipeline``, ``test_mode``, ``indices``, …).
    """

    METAINFO: dict = dict()

    def __init__(self, split: str = "train", data_root: str | None = None, data_prefix: dict | None = None,
                 image_info: str = "image_data_split.json", refer_file: str = "refer_{}.json",
                 skip_image_ids: Iterable[int] = CLIPSEG_SKIPPED_IMAGES, img_suffix: str = ".jpg",
                 metainfo: dict | None = None, **kwargs) -> None:
        self.split = split
        self._tasks = read_tasks(data_root or "", split, image_info, refer_file, skip_image_ids)
        phrases = sorted({task["phrase"] for task, _ in self._tasks})
        self._phrase_ids = {phrase: k for k, phrase in enumerate(phrases, start=1)}
        self._by_class: dict[int, list[int]] | None = None
        super().__init__(metainfo=dict(metainfo or {}, classes=("background", *phrases)), data_root=data_root,
                         data_prefix=dict(img_path="images") if data_prefix is None else data_prefix,
                         img_suffix=img_suffix, **kwargs)

    def load_data_list(self) -> list[dict]:
        folder = self.data_prefix.get("img_path") or ""
        items = []
        for task, image in self._tasks:
            items.append(dict(
                img_path=osp.join(folder, f"{task['image_id']}{self.img_suffix}"),
                task_id=task["task_id"], image_id=task["image_id"], phrase=task["phrase"],
                phrase_id=self._phrase_ids[task["phrase"]], polygons=task["Polygons"],
                height=int(image["height"]), width=int(image["width"]),
                label_map=None, reduce_zero_label=False, seg_fields=[]))
        return items

    def full_init(self) -> None:
        super().full_init()
        self._tasks = []  # the items hold them now (serialised)

    def images_of_class(self) -> dict[int, list[int]]:
        """Class id → the indices of the items whose phrase it is (CLIPSeg's ``samples_by_phrase``,
        which its training draws visual prompts from), from the annotations alone."""
        if self._by_class is None:
            index: dict[int, list[int]] = {}
            for i in range(len(self)):
                index.setdefault(int(self.get_data_info(i)["phrase_id"]), []).append(i)
            self._by_class = index
        return {c: list(items) for c, items in self._by_class.items()}


def read_tasks(root: str, split: str, image_info: str = "image_data_split.json",
               refer_file: str = "refer_{}.json", skip_image_ids: Iterable[int] = CLIPSEG_SKIPPED_IMAGES
               ) -> list[tuple[dict, dict]]:
    """``(task, image record)`` of every task of ``split`` under ``root`` (see ``PhraseCutDataset``)."""
    splits = [s for s in split.split("_") if s]
    if not splits:
        raise OvdenseError(f"no PhraseCut split in {split!r}: use train, val, test, miniv or e.g. val_miniv")
    images = {}
    for record in _read_json(osp.join(root, image_info), "image_data_split.json"):
        if record["split"] in splits:
            images[int(record["image_id"])] = record
    skip = {int(i) for i in skip_image_ids}
    by_image: dict[int, list[dict]] = {}
    for name in splits:
        for task in _read_json(osp.join(root, refer_file.format(name)), f"refer_{name}.json"):
            by_image.setdefault(int(task["image_id"]), []).append(task)
    out = []
    for image_id, tasks in by_image.items():
        if image_id in skip:
            continue
        if image_id not in images:
            raise OvdenseError(f"PhraseCut task {tasks[0].get('task_id')} names image {image_id}, which "
                               f"{osp.join(root, image_info)} does not list in split {split!r}: the "
                               "annotation files come from different downloads")
        out.extend((task, images[image_id]) for task in tasks)
    return out


def _read_json(path: str, what: str):
    if not osp.isfile(path):
        raise OvdenseError(f"no {what} at {path}: data_root must be PhraseCut's VGPhraseCut_v0 folder "
                           "(python download_dataset.py in ChenyunWu/PhraseCutDataset writes it)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# The label map


def polygons_mask(instances: Sequence, height: int, width: int) -> np.ndarray:
    """The region of a task, ``uint8 [height, width]``: 1 inside any polygon of any instance, 0
    elsewhere.

    PhraseCut's own rasterisation (``utils/data_transfer.py``, ``polygons_to_mask``, which its
    evaluator scores against): points are ``[x, y]`` (x the column), truncated to integers;
    each polygon is filled with its outline (PIL); polygons of fewer than two points are
    skipped. (CLIPSeg's loader, ``PhraseCut.load_sample``, swaps each point to ``[y, x]`` for
    scikit-image's ``polygon2mask``, which keeps the pixels whose centres lie inside: the two
    differ on boundary pixels.)
    """
    canvas = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(canvas)
    for polygons in instances:
        for polygon in polygons:
            if len(polygon) < 2:
                continue
            draw.polygon([(int(x), int(y)) for x, y in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)


@TRANSFORMS.register_module()
class LoadPhraseMask(BaseTransform):
    """A ``PhraseCutDataset`` item's region as ``gt_seg_map`` (``uint8 [H, W]``, 1 the phrase's
    pixels, 0 the rest; ``polygons_mask``) at the loaded image's size (the annotated size
    without an image), added to ``seg_fields``; ``label_classes = [0, phrase_id]`` (label → class
    id). ``phrase`` and ``label_classes`` reach a sample's metainfo when ``PackSegInputs`` lists
    them in ``meta_keys``.
    """

    def transform(self, results: dict) -> dict:
        if "polygons" not in results or "phrase_id" not in results:
            raise OvdenseError("LoadPhraseMask draws a PhraseCutDataset item's polygons; this item has none "
                               "(use LoadAnnotations for label-map datasets)")
        if "img" in results:
            height, width = results["img"].shape[:2]
        else:
            height, width = results["height"], results["width"]
        results["gt_seg_map"] = polygons_mask(results["polygons"], height, width)
        fields = results.setdefault("seg_fields", [])
        if "gt_seg_map" not in fields:
            fields.append("gt_seg_map")
        results["label_classes"] = [0, int(results["phrase_id"])]
        return results


# --------------------------------------------------------------------------------------------
# The metric


def threshold_counts(probability: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """``int64 [4, T]``: the pixels' true positives, false positives, false negatives and true
    negatives at each of ``THRESHOLDS`` (predicted foreground: ``p > t``), label-255 pixels left
    out — CLIPSeg's ``FixedIntervalMetrics.add`` (metrics.py) for one sample, which compares in
    the probabilities' float32."""
    p = probability.reshape(-1).float()
    g = gt.reshape(-1)
    keep = g != IGNORE_INDEX
    p, g = p[keep], (g[keep] == 1)
    p, order = torch.sort(p)
    positives = torch.cat([g.new_zeros(1, dtype=torch.int64), torch.cumsum(g[order].long(), 0)])  # P + 1
    t = torch.as_tensor(THRESHOLDS, dtype=torch.float32, device=p.device)
    below = torch.searchsorted(p, t, right=True)  # T: pixels with p ≤ t
    fn = positives[below]
    tp = positives[-1] - fn
    fp = (p.numel() - below) - tp
    tn = below - fn
    return torch.stack([tp, fp, fn, tn]).cpu().numpy().astype(np.int64)


def simpson(y: Sequence[float], x: Sequence[float]) -> float:
    """∫ y dx by Simpson's rule over the points ``(x, y)`` as ``scipy.integrate.simps(y, x)`` did
    before SciPy 1.11 (``even="avg"``), which CLIPSeg's AP calls: an odd number of points, pairs
    of intervals each integrated by the parabola through their three points; an even number, the
    mean of (Simpson on all but the last point + the trapezoid of the last interval) and (the
    trapezoid of the first + Simpson on all but the first). A zero-width interval adds nothing
    (SciPy's guards)."""
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    if len(y) < 2:
        return 0.0
    if len(y) % 2:
        return _simpson_odd(y, x)
    last = _simpson_odd(y[:-1], x[:-1]) + 0.5 * (x[-1] - x[-2]) * (y[-1] + y[-2])
    first = 0.5 * (x[1] - x[0]) * (y[0] + y[1]) + _simpson_odd(y[1:], x[1:])
    return float(0.5 * (last + first))


def _simpson_odd(y: np.ndarray, x: np.ndarray) -> float:
    total = 0.0
    for k in range(0, len(y) - 2, 2):
        h0, h1 = x[k + 1] - x[k], x[k + 2] - x[k + 1]
        ratio = h0 / h1 if h1 != 0 else 0.0
        inverse = 1.0 / ratio if ratio != 0 else 0.0
        middle = (h0 + h1) ** 2 / (h0 * h1) if h0 * h1 != 0 else 0.0
        total += (h0 + h1) / 6.0 * (y[k] * (2.0 - inverse) + y[k + 1] * middle + y[k + 2] * (2.0 - ratio))
    return float(total)


def threshold_index(threshold: float) -> int:
    index = int(np.argmin(np.abs(THRESHOLDS - threshold)))
    if abs(THRESHOLDS[index] - threshold) > 1e-9:
        raise OvdenseError(f"threshold {threshold} is not one of CLIPSeg's (0.02, 0.04, …, 0.98)")
    return index


def phrase_grounding_scores(counts: np.ndarray, threshold: float = 0.3) -> dict[str, float]:
    """mIoU, IoU_FG and AP (percent) from the per-sample counts ``[N, 4, T]`` of ``threshold_counts``,
    as CLIPSeg's ``FixedIntervalMetrics.value`` (metrics.py) computes them for PhraseCut, where
    score.py gives each sample its own class (its dataset index):

    * mIoU: the mean over samples of ``tp / (1 + tp + fp + fn)`` at ``threshold`` (``miou_0.3``);
    * IoU_FG: the same ratio of the counts summed over all samples (``fgiou_0.3``);
    * AP: with ``P = TP / (1 + TP + FP)`` and ``R = TP / (1 + TP + FN)`` of the summed counts at
      each threshold that predicts any pixel, the distinct ``(R, P)`` pairs sorted by R,
      integrated by ``simpson``. Departure: ties in R are ordered by P here; the official code
      leaves them in a Python set's order.

    The paper's PhraseCut table reports them at t = 0.3 (Tables.ipynb: ``pc_miou_0.3``,
    ``pc_fgiou_0.3``, ``pc_ap``). With no sample, or no pixel predicted at any threshold (the
    official code stops there), AP is 0.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[1:] != (4, len(THRESHOLDS)):
        raise ValueError(f"counts must be [N, 4, {len(THRESHOLDS)}], got {counts.shape}")
    j = threshold_index(threshold)
    if len(counts) == 0:
        return {"mIoU": 0.0, "IoU_FG": 0.0, "AP": 0.0}
    tp, fp, fn = (counts[:, k].astype(np.float64) for k in range(3))  # N, T each
    per_sample = tp[:, j] / (1 + tp[:, j] + fp[:, j] + fn[:, j])
    TP, FP, FN = tp.sum(0), fp.sum(0), fn.sum(0)  # T
    predicted = TP + FP > 0
    precision = TP[predicted] / (1 + TP[predicted] + FP[predicted])
    recall = TP[predicted] / (1 + TP[predicted] + FN[predicted])
    pairs = sorted(set(zip(recall.tolist(), precision.tolist())))
    ap = simpson([p for _, p in pairs], [r for r, _ in pairs]) if pairs else 0.0
    return {"mIoU": 100.0 * float(per_sample.mean()),
            "IoU_FG": 100.0 * float(TP[j] / (1 + TP[j] + FP[j] + FN[j])),
            "AP": 100.0 * ap}


@METRICS.register_module()
class PhraseGroundingMetric(BaseMetric):
    """PhraseCut's scores as CLIPSeg's paper reports them: mIoU, IoU_FG and AP in percent
    (``phrase_grounding_scores``), from each sample's ``seg_logits`` (``[1, H, W]``, the phrase's
    foreground probability) and ``gt_sem_seg`` (``[1, H, W]``, 1 foreground, 0 background, 255
    ignored).

    Args:
        threshold: the score threshold of mIoU and IoU_FG, one of 0.02, 0.04, …, 0.98 (the
            paper's 0.3).
        resize_to: ``(h, w)`` to score at, or None for each image's own size (PhraseCut's
            ``evaluate.py``). CLIPSeg's ``score.py`` scored at the network's input size, both the
            image and the mask squashed to 352 × 352 (``PhraseCut('test', image_size=352,
            aug_crop=False)``); ``(352, 352)`` resizes the probability (bilinear) and the mask
            (nearest, as ``PhraseCut.load_sample``) to that size.
        collect_device, prefix: ``BaseMetric``'s.
    """

    def __init__(self, threshold: float = 0.3, resize_to: Sequence[int] | None = None,
                 collect_device: str = "cpu", prefix: str | None = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        threshold_index(threshold)
        self.threshold = float(threshold)
        self.resize_to = None if resize_to is None else tuple(int(s) for s in resize_to)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            probability = sample["seg_logits"]["data"]  # 1, H, W
            gt = sample["gt_sem_seg"]["data"]  # 1, H, W
            if probability.dim() != 3 or probability.shape[0] != 1:
                raise OvdenseError(f"PhraseGroundingMetric reads one probability map [1, H, W] a sample, got "
                                   f"{tuple(probability.shape)}: test on samples that name their phrase "
                                   "(PackSegInputs meta_keys with 'phrase') and no test_classnames")
            if self.resize_to is not None:
                probability = F.interpolate(probability[None].float(), self.resize_to, mode="bilinear",
                                            align_corners=False)[0]
                gt = F.interpolate(gt[None].float(), self.resize_to, mode="nearest")[0].long()
            if probability.shape[-2:] != gt.shape[-2:]:
                raise OvdenseError(f"the probability map is {tuple(probability.shape[-2:])}, the ground "
                                   f"truth {tuple(gt.shape[-2:])}: predict at the image's size")
            self.results.append(threshold_counts(probability, gt))

    def compute_metrics(self, results: list) -> dict[str, float]:
        counts = np.stack(results) if results else np.zeros((0, 4, len(THRESHOLDS)), np.int64)
        return phrase_grounding_scores(counts, self.threshold)
