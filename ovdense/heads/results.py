"""What every head's result offers (``HeadResult``), and the pieces the result types share.

Every result answers ``to_json(**info)`` (a JSON-ready dict; ``info`` adds what the caller knows
and the result does not, such as the image's path or the model's name), ``overlay(image)`` (an
RGB ``uint8`` picture of the result on the image) and ``save(out_dir, stem, image, **info)``,
which writes the files ``ovdense`` writes for it, through ``ovdense.io``'s atomic writers, the
JSON last (so a JSON that is there marks a complete set; ``--skip-existing`` relies on it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class HeadResult(Protocol):
    """The protocol of every head's result (segmentation, detection, anomaly)."""

    def to_json(self, **info: Any) -> Any: ...

    def overlay(self, image) -> np.ndarray: ...

    def save(self, out_dir: str | os.PathLike, stem: str, image, /, **info: Any) -> list[Path]: ...


class DetectionOutputs:
    """``overlay`` and ``save`` of a detection result (``boxes``, ``scores``, ``class_ids``,
    ``masks``, ``classes`` and its own ``to_json()``): a base class of ``DetectionResult``."""

    OUTPUTS = ("_overlay.jpg", ".json")

    def overlay(self, image) -> np.ndarray:
        """``ovdense detect``'s picture: masks, boxes and labels on the image, RGB ``uint8 [H, W, 3]``."""
        from ovdense.io import draw_detections, load_image

        return draw_detections(load_image(image), self)

    def save(self, out_dir: str | os.PathLike, stem: str, image, /, **info: Any) -> list[Path]:
        """Write ``<stem>_overlay.jpg`` and ``<stem>.json`` (``to_json()`` and ``info``) in ``out_dir``."""
        from ovdense.io import write_image, write_json

        out = Path(out_dir)
        report = self.to_json()
        report.update(info)
        return [write_image(out / f"{stem}_overlay.jpg", DetectionOutputs.overlay(self, image)),
                write_json(out / f"{stem}.json", report)]
