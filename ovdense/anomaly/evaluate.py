"""Evaluate WinCLIP / WinCLIP+ on MVTec AD or VisA folders, category by category."""

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

READERS = {"mvtec": (mvtec_categories, iter_mvtec), "visa": (visa_categories, iter_visa)}


def object_name(category: str) -> str:
    """The prompt's object name for a category folder: ``"metal_nut"`` → ``"metal nut"``;
    VisA's numbered categories drop the digits (``"pcb1"`` → ``"pcb"``)."""
    return category.replace("_", " ").rstrip("0123456789").strip() or category


def evaluate(
    backbone: ClipBackbone,
    dataset: str,
    root: str | Path,
    categories: list[str] | None = None,
    shots: int = 0,
    prompt_set: str = "paper",
    batch: int = 8,
) -> dict[str, AnomalyScores]:
    """Per category, the metrics of WinCLIP (``shots = 0``) or WinCLIP+ with the first
    ``shots`` normal training images as references."""
    if dataset not in READERS:
        raise OvdenseError(f"unknown dataset {dataset!r}; choose from {list(READERS)}")
    list_categories, iterate = READERS[dataset]
    available = list_categories(root)
    categories = categories or available
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise OvdenseError(f"categories {unknown} are not in {root}; it has {available}")
    results = {}
    for category in categories:
        winclip = WinClip(backbone, object_name(category), prompt_set=prompt_set)
        if shots:
            references = [s.image for s in iterate(root, category, "train")]
            if len(references) < shots:
                raise OvdenseError(f"{category}: {shots} shots asked, only {len(references)} normal "
                                   "training images")
            winclip.set_references(references[:shots])
        samples = list(iterate(root, category, "test"))
        metrics = AnomalyMetrics()
        for start in tqdm(range(0, len(samples), batch), desc=category, unit="batch", file=sys.stderr):
            chunk = samples[start:start + batch]
            for sample, result in zip(chunk, winclip.predict([s.image for s in chunk])):
                metrics.update(result.score, sample.label, result.map, load_mask(sample, result.map.shape))
        results[category] = metrics.scores()
    return results
