"""Evaluate WinCLIP / WinCLIP+ or AdaptCLIP on MVTec AD or VisA folders, category by category."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from ovdense.anomaly.winclip import WinClip
from ovdense.backbone.clip import ClipBackbone
from ovdense.data.anomaly_datasets import (
    iter_mvtec,
    iter_visa,
    load_mask,
    mvtec_categories,
    visa_categories,
)
from ovdense.errors import OvdenseError
from ovdense.eval.anomaly import AnomalyMetrics, AnomalyScores
from ovdense.io import MAX_PIXELS, load_image

READERS = {"mvtec": (mvtec_categories, iter_mvtec), "visa": (visa_categories, iter_visa)}


def object_name(category: str) -> str:
    """The prompt's object name for a category folder: ``"metal_nut"`` → ``"metal nut"``;
    VisA's numbered categories drop the digits (``"pcb1"`` → ``"pcb"``)."""
    return category.replace("_", " ").rstrip("0123456789").strip() or category


def check_dataset(dataset: str, root: str | Path, categories: list[str] | None = None,
                  shots: int = 0) -> list[str]:
    """The categories to evaluate, after checking (from the folder and split files alone, no
    image is decoded) that each has test images, both normal and anomalous (the AUROCs need
    both), and at least ``shots`` normal training images.

    Raises:
        OvdenseError: an unknown dataset, a root that is not the dataset's folder (one level
            too high or too low is named), unknown categories, or nothing to evaluate.
    """
    if dataset not in READERS:
        raise OvdenseError(f"unknown dataset {dataset!r}; choose from {list(READERS)}")
    if shots < 0:
        raise OvdenseError(f"shots must be ≥ 0, got {shots}")
    root = Path(root)
    if root.is_file():
        raise OvdenseError(f"--root {root} is a file; give the dataset's folder")
    list_categories, iterate = READERS[dataset]
    available = list_categories(root)
    if not available:
        raise OvdenseError(_no_categories_message(dataset, root))
    categories = categories or available
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise OvdenseError(f"categories {unknown} are not in {root}; it has {available}")
    for category in categories:
        labels = {s.label for s in iterate(root, category, "test")}
        if labels != {0, 1}:
            have = "no test images" if not labels else ("only normal" if labels == {0} else "only anomalous")
            raise OvdenseError(f"{category} in {root} has {have} test images; the metrics need both "
                               "normal and anomalous ones")
        if shots:
            count = sum(1 for _ in iterate(root, category, "train"))
            if count < shots:
                raise OvdenseError(f"{category}: {shots} shots asked, only {count} normal training images")
    return list(categories)


def _no_categories_message(dataset: str, root: Path) -> str:
    if dataset == "mvtec":
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        below = [p for p in folders if mvtec_categories(p)]
        if below:
            return (f"no MVTec AD category in {root}, but {below[0]} has some: is --root one level too "
                    f"high? Point it at the folder holding the category folders (bottle/, cable/, ...)")
        if (root.name in ("test", "train", "ground_truth") or (root / "good").is_dir()
                or (root / "train").is_dir() or (root / "ground_truth").is_dir()):
            return (f"{root} is a category or inside a category: point --root at the folder holding "
                    "the category folders (bottle/, cable/, ...)")
        return (f"no MVTec AD category in {root}: it needs <category>/test/<defect>/*.png folders "
                "(point --root at the folder holding bottle/, cable/, ...)")
    return f"{root} lists no VisA category in split_csv/1cls.csv"


METHODS = ("winclip", "adaptclip")


def reference_images(dataset: str, root: str | Path, category: str, shots: int,
                     seed: int | None = None) -> list[Path]:
    """The ``shots`` normal training images of a category used as references: the first ``shots``
    (sorted by name), or with ``seed`` a seeded draw without replacement (``random.Random(seed)``)."""
    import random

    _, iterate = READERS[dataset]
    images = [s.image for s in iterate(root, category, "train")]
    if seed is None:
        return images[:shots]
    return random.Random(seed).sample(images, shots)


def evaluate(
    backbone: ClipBackbone,
    dataset: str,
    root: str | Path,
    categories: list[str] | None = None,
    shots: int = 0,
    prompt_set: str = "paper",
    batch: int = 8,
    max_pixels: int | None = MAX_PIXELS,
    method: str = "winclip",
    head_checkpoint: str | Path | None = None,
    reference_seed: int | None = None,
    defects: list[str] | None = None,
) -> dict[str, AnomalyScores]:
    """Per category, the metrics of ``method``: WinCLIP (``shots = 0``) or WinCLIP+, or AdaptCLIP
    (``head_checkpoint``: its adapters; ``None``: those that ship for the backbone) zero- or
    few-shot; the references are ``reference_images`` (the first ``shots`` normal training images,
    or a draw by ``reference_seed``); ``defects``: only the anomalous test images of these defect
    kinds (with every normal one). Every image and mask is read under the pixel limit
    ``max_pixels`` (``ovdense.io``)."""
    if method not in METHODS:
        raise OvdenseError(f"unknown anomaly method {method!r}; choose from {list(METHODS)}")
    categories = check_dataset(dataset, root, categories, shots)
    _, iterate = READERS[dataset]
    adaptclip = None
    if method == "adaptclip":  # one head for every category: its prompts do not name the object
        from ovdense.anomaly.adaptclip import AdaptClip

        adaptclip = AdaptClip(backbone, head_checkpoint=head_checkpoint)
    results = {}
    for category in categories:
        if adaptclip is not None:
            head = adaptclip
            head.object_name, head.memory, head.reference_size = object_name(category), None, None
        else:
            head = WinClip(backbone, object_name(category), prompt_set=prompt_set)
        if shots:
            references = reference_images(dataset, root, category, shots, reference_seed)
            head.set_references([load_image(r, max_pixels=max_pixels) for r in references])
        samples = [s for s in iterate(root, category, "test") if defects is None or s.label == 0
                   or s.defect in defects]
        metrics = AnomalyMetrics()
        for start in tqdm(range(0, len(samples), batch), desc=category, unit="batch", file=sys.stderr):
            chunk = samples[start:start + batch]
            images = [load_image(s.image, max_pixels=max_pixels) for s in chunk]
            for sample, result in zip(chunk, head.predict(images)):
                mask = load_mask(sample, result.map.shape, max_pixels=max_pixels)
                metrics.update(result.score, sample.label, result.map, mask)
        results[category] = metrics.scores()
    return results
