"""Where the embedded toy CLIPs live, and a model config's own inference defaults.

A JSON model config (open_clip's layout) may carry an ``"ovdense"`` entry: the inference
defaults that travel with its weights (the toy model's are its training wording, its native
window and the segmentation head that suits it best). This module reads that entry without
torch, so the command line can settle its defaults before any model loads; ``backbone.clip``
reads the same entry when it builds the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ovdense.errors import OvdenseError

TOY_NAME = "toy"
#: the toy CLIP whose image tower CLIPSelf refined (``configs/clipself/clipself_toy_synthetic.py``
#: with region proposals); its text tower, config and defaults are the toy's
TOY_CLIPSELF_NAME = "toy-clipself"
#: the embedded models' names
TOY_NAMES = (TOY_NAME, TOY_CLIPSELF_NAME)
#: ovdense's packaged files: the toy CLIPs and the heads that ship for them.
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOY_CONFIG = ASSETS / "toy-clip.json"
TOY_WEIGHTS = ASSETS / "toy-clip.safetensors"
#: ``visual.*`` only (fp16): the rest of ``toy-clipself`` is ``TOY_WEIGHTS``
TOY_CLIPSELF_VISUAL = ASSETS / "toy-clipself-visual.safetensors"
#: what a config's ``"ovdense"`` entry may hold: prompt templates, the short side and the sliding
#: window of the training-free heads, and ``method``, the segmentation head used when none is named
DEFAULT_KEYS = ("templates", "short_side", "window", "method")


def toy_files() -> tuple[Path, Path]:
    """The embedded toy CLIP's config and weights (``ovdense/assets``), trained in-repo on the
    synthetic world by ``tools/train_toy_clip.py``; it knows only that world."""
    config, weights = TOY_CONFIG, TOY_WEIGHTS
    if not config.is_file() or not weights.is_file():
        raise OvdenseError(
            f"the toy model is missing from this install ({ASSETS}); reinstall ovdense or "
            "train it with tools/train_toy_clip.py and copy config.json and model.safetensors there"
        )
    return config, weights


def toy_clipself_visual() -> Path:
    """The CLIPSelf-refined toy image tower (``visual.*``, fp16) that ``toy-clipself`` puts on the
    toy CLIP (``tools/model_converters/export_visual_tower.py`` wrote it from the refinement's
    ``clipself_backbone.safetensors``)."""
    if not TOY_CLIPSELF_VISUAL.is_file():
        raise OvdenseError(
            f"the toy-clipself image tower is missing from this install ({TOY_CLIPSELF_VISUAL}); reinstall "
            "ovdense or refine the toy with configs/clipself/clipself_toy_synthetic.py and export it with "
            "tools/model_converters/export_visual_tower.py"
        )
    return TOY_CLIPSELF_VISUAL


def read_defaults(config: dict, where: Path | str) -> dict:
    """The ``"ovdense"`` entry of the parsed model config ``config`` (``{}`` if it has none);
    unknown keys and a ``method`` that is not a name are refused, naming ``where``."""
    defaults = config.get("ovdense", {})
    if not isinstance(defaults, dict):
        raise OvdenseError(f"{where}: its 'ovdense' entry must be an object, not {type(defaults).__name__}")
    unknown = set(defaults) - set(DEFAULT_KEYS)
    if unknown:
        raise OvdenseError(f"{where}: unknown keys {sorted(unknown)} in its 'ovdense' entry "
                           f"(known: {', '.join(DEFAULT_KEYS)})")
    if "method" in defaults and not isinstance(defaults["method"], str):
        raise OvdenseError(f"{where}: 'method' in its 'ovdense' entry must be a head's name, "
                           f"not {defaults['method']!r}")
    return dict(defaults)


def model_defaults(name: str) -> dict:
    """The inference defaults of model ``name`` as ``create_backbone`` would read them, before it
    loads: the toy models', a JSON config's, ``{}`` for open_clip names. A config that cannot be
    read gives ``{}`` here; loading the model then reports it."""
    if name in TOY_NAMES:
        path = TOY_CONFIG
    elif name.endswith(".json"):
        path = Path(name)
    else:
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return read_defaults(config, path) if isinstance(config, dict) else {}
