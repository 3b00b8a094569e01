"""The official wusize/CLIM code, read from a mirror, for the tests that compare ovdense with it
(tests/test_fvit_official.py and test_fvit_official_lvis.py: the F-ViT detectors, CLIM's ``ovdet`` FVLM;
tests/test_fvit_converter.py: its checkpoint layout; tests/test_ovcoco_metric_official.py: the OV-COCO
evaluation): ``clim_checkout`` writes the files a test needs, ``import_clim`` imports ``ovdet`` from them.
``OVDENSE_CLIM_REPO`` names the mirror (a bare git repository, or a clone); without it the tests skip."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

CLIM_REPO = Path(os.environ.get("OVDENSE_CLIM_REPO", "/work/.mirror/wusize+CLIM/repo"))
#: CLIM's OV-COCO F-ViT (FVLM) on OpenAI ViT-B/16, the config its README's 29.7 novel AP50 comes from
CLIM_CONFIG = "ovdet/configs/clip_based/openai_vitb16/faster_rcnn_fpn_openai_vitb16_clim_bs64_ov_coco_3e.py"


def mirror_checkout(repo: Path, dest: Path, paths: tuple[str, ...], variable: str) -> Path:
    """``paths`` of the HEAD of the mirror ``repo`` written under ``dest`` (``git archive``: the mirror
    is only read, never given an index or a work tree), or skip, naming ``variable``."""
    if not repo.is_dir():
        pytest.skip(f"no mirror at {repo} (set {variable})")
    git_dir = repo / ".git" if (repo / ".git").exists() else repo
    result = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "--format=tar", "HEAD", "--", *paths],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"{repo} lacks {paths}: {result.stderr.decode(errors='replace').strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python ≥ 3.10.12 / 3.11.4
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        archive.extractall(dest, **safe)
    return dest


def clim_checkout(dest: Path, paths: tuple[str, ...]) -> Path:
    """``paths`` of wusize/CLIM's mirror written under ``dest``, or skip."""
    return mirror_checkout(CLIM_REPO, dest, paths, "OVDENSE_CLIM_REPO")


def _is_open_clip(name: str) -> bool:
    return name == "open_clip" or name.startswith("open_clip.")


def import_clim(tree: Path):
    """``import ovdet`` from ``tree`` with CLIM's open_clip fork as ``open_clip`` during the import only
    (pip's open_clip stays ``open_clip`` for ovdense; CLIM's ``clip_vit`` keeps its own reference to the
    fork); a module already imported (another test's) is reused."""
    import ovdense.mm.detection  # noqa: F401 - ovdense binds pip's open_clip first

    if "ovdet" in sys.modules:
        return sys.modules["ovdet"]
    import open_clip as pip_open_clip

    own = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_open_clip(name)}
    folders = [str(tree / "src"), str(tree / "ovdet")]
    sys.path[:0] = folders
    try:
        import open_clip as fork
        import ovdet
    finally:
        for name in [name for name in sys.modules if _is_open_clip(name)]:
            sys.modules.pop(name)
        sys.path[:] = [p for p in sys.path if p not in folders]
        sys.modules.update(own)
    import open_clip

    assert open_clip is pip_open_clip and fork is not pip_open_clip
    assert ovdet.models.backbones.clip_vit.open_clip is fork
    return ovdet
