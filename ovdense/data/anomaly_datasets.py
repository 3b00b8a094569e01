"""Readers of the anomaly-detection datasets in their real layouts.

* MVTec AD: ``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect>/*.png``,
  ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (defect pixels 255);
* VisA: ``<root>/split_csv/1cls.csv`` with ``object,split,label,image,mask`` rows (paths
  relative to ``<root>``; masks have one value > 0 per defect region).

Both yield ``AnomalySample``s; ``load_mask`` reads a sample's mask as ``bool [H, W]``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ovdense.errors import OvdenseError
from ovdense.io import IMAGE_SUFFIXES, MAX_PIXELS, check_pixels


@dataclass(frozen=True)
class AnomalySample:
    image: Path
    mask: Path | None  # None for normal images
    label: int  # 0 normal, 1 anomalous
    category: str
    defect: str  # "good" for normal images


def load_mask(sample: AnomalySample, size: tuple[int, int],
              max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """The sample's defect mask ``bool [H, W]`` (all False for normal images); ``size`` is the
    image's ``(H, W)``, which the mask must match. The mask is refused over ``max_pixels``
    (``ovdense.io``'s limit, checked from its header) or when it cannot be decoded."""
    if sample.mask is None:
        return np.zeros(size, bool)
    if not sample.mask.is_file():
        raise OvdenseError(f"mask not found: {sample.mask}")
    try:
        with Image.open(sample.mask) as pil:
            check_pixels(pil.size, max_pixels, sample.mask)
            mask = np.asarray(pil.convert("L")) > 0
    except OvdenseError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OvdenseError(f"cannot read mask {sample.mask}: {e}") from e
    if mask.shape != tuple(size):
        raise OvdenseError(f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]}, its image is "
                           f"{size[1]}x{size[0]}")
    return mask


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def mvtec_categories(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise OvdenseError(f"dataset folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def iter_mvtec(root: str | Path, category: str, split: str = "test") -> Iterator[AnomalySample]:
    """MVTec AD samples of one category; ``split`` is ``"train"`` (normal only) or ``"test"``."""
    folder = Path(root) / category / split
    if not folder.is_dir():
        raise OvdenseError(f"{folder} not found: is {root} an MVTec AD folder with category {category!r}?")
    for defect_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in _images(defect_dir):
            if defect == "good":
                yield AnomalySample(image, None, 0, category, defect)
            else:
                mask = Path(root) / category / "ground_truth" / defect / f"{image.stem}_mask.png"
                yield AnomalySample(image, mask, 1, category, defect)


def _visa_rows(root: Path) -> list[dict]:
    split_file = root / "split_csv" / "1cls.csv"
    if not split_file.is_file():
        raise OvdenseError(f"{split_file} not found: is {root} a VisA folder?")
    try:
        with open(split_file, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise OvdenseError(f"cannot read {split_file}: {e}") from e
    missing = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
    if missing:
        raise OvdenseError(f"{split_file} lacks the columns {sorted(missing)}")
    return rows


def visa_categories(root: str | Path) -> list[str]:
    return sorted({row["object"] for row in _visa_rows(Path(root))})


def iter_visa(root: str | Path, category: str, split: str = "test") -> Iterator[AnomalySample]:
    """VisA samples of one category from ``split_csv/1cls.csv``."""
    root = Path(root)
    for row in _visa_rows(root):
        if row["object"] != category or row["split"] != split:
            continue
        anomalous = row["label"] == "anomaly"
        mask = root / row["mask"] if anomalous and row["mask"] else None
        yield AnomalySample(root / row["image"], mask, int(anomalous), category,
                            "anomaly" if anomalous else "good")
