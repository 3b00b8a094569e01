"""What every head's result offers: the ``HeadResult`` protocol (``tests/test_registry.py``
checks every registered head's result against it).

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
