"""The official wusize/CLIPSelf code, read from a mirror, for tests/test_clipself_official.py:
``import_clipself`` imports its open_clip fork and its ``training`` package (``clipself.CLIPSelf``,
``data.GridDistillDataset`` / ``ProposalDistillDataset`` / ``COCOPanopticDataset``,
``train.student_teacher_ensemble``, ``zero_shot.macc_with_is_thing``) from a ``git archive`` of ``src/``.
``OVDENSE_CLIPSELF_REPO`` names the mirror; without it the tests skip."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

from official_clim import _is_open_clip, mirror_checkout

CLIPSELF_REPO = Path(os.environ.get("OVDENSE_CLIPSELF_REPO", "/work/.mirror/wusize+CLIPSelf/repo"))


def _is_fork(name: str) -> bool:
    return _is_open_clip(name) or name == "training" or name.startswith("training.")


def _rgb2id(color):
    import numpy as np

    color = np.asarray(color, dtype=np.int32)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def import_clipself(dest: Path) -> types.SimpleNamespace:
    """The fork's modules, imported with the fork as ``open_clip`` during the import only (pip's
    open_clip stays ``open_clip`` for ovdense afterwards). ``panopticapi`` (cocodataset/panopticapi, not
    on PyPI; its ``data.py`` imports ``utils`` for ``rgb2id``) is given a stand-in with that one
    function, the COCO panoptic format's definition ``id = R + 256·G + 256²·B``."""
    import open_clip as pip_open_clip

    tree = mirror_checkout(CLIPSELF_REPO, dest, ("src",), "OVDENSE_CLIPSELF_REPO")
    own = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_fork(name)}
    stand_in = types.ModuleType("panopticapi")
    stand_in.utils = types.ModuleType("panopticapi.utils")
    stand_in.utils.rgb2id = _rgb2id
    missing = [name for name in ("panopticapi", "panopticapi.utils") if name not in sys.modules]
    sys.modules.update({"panopticapi": stand_in, "panopticapi.utils": stand_in.utils} if missing else {})
    folder = str(tree / "src")
    sys.path.insert(0, folder)
    try:
        import open_clip as fork
        from open_clip import model, transform
        from training import clipself, data, train, zero_shot
    finally:
        for name in [name for name in sys.modules if _is_fork(name)]:
            sys.modules.pop(name)
        for name in missing:
            sys.modules.pop(name, None)
        sys.path.remove(folder)
        sys.modules.update(own)
    import open_clip

    assert open_clip is pip_open_clip and fork is not pip_open_clip
    return types.SimpleNamespace(open_clip=fork, model=model, transform=transform, clipself=clipself,
                                 data=data, train=train, zero_shot=zero_shot)
