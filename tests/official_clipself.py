"""The official wusize/CLIPSelf code, read from a mirror, for tests/test_clipself_official.py:
``import_clipself`` imports its open_clip fork and its ``training`` package (``clipself.CLIPSelf``,
``data.GridDistillDataset`` / ``ProposalDistillDataset``, ``train.student_teacher_ensemble``) from a
``git archive`` of ``src/``. ``OVDENSE_CLIPSELF_REPO`` names the mirror; without it the tests skip."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

from official_clim import _is_open_clip, mirror_checkout

CLIPSELF_REPO = Path(os.environ.get("OVDENSE_CLIPSELF_REPO", "/work/.mirror/wusize+CLIPSelf/repo"))


def _is_fork(name: str) -> bool:
    return _is_open_clip(name) or name == "training" or name.startswith("training.")


def import_clipself(dest: Path) -> types.SimpleNamespace:
    """The fork's modules, imported with the fork as ``open_clip`` during the import only (pip's
    open_clip stays ``open_clip`` for ovdense afterwards). ``panopticapi`` (imported by its ``data.py``
    for the panoptic evaluation, not used here) is given an empty stand-in during the import."""
    import open_clip as pip_open_clip

    tree = mirror_checkout(CLIPSELF_REPO, dest, ("src",), "OVDENSE_CLIPSELF_REPO")
    own = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_fork(name)}
    stand_in = types.ModuleType("panopticapi")
    stand_in.utils = types.ModuleType("panopticapi.utils")
    missing = [name for name in ("panopticapi", "panopticapi.utils") if name not in sys.modules]
    sys.modules.update({"panopticapi": stand_in, "panopticapi.utils": stand_in.utils} if missing else {})
    folder = str(tree / "src")
    sys.path.insert(0, folder)
    try:
        import open_clip as fork
        from open_clip import model, transform
        from training import clipself, data, train
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
                                 data=data, train=train)
