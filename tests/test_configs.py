"""configs/ hold data: every config parses under the interpreter of a virtual environment.

mmengine 0.10 decides whether a config's ``import`` is of a "builtin" module by comparing the
module's file with ``dirname(dirname(sys.executable))`` (``mmengine/config/utils.py``,
``_is_builtin_module``). Inside a venv or a conda env that is the environment, not the base Python,
so every standard-library import counts as a lazy import and the config, and every config that
inherits it, is refused. The system interpreter hides this; users meet it. These tests need only
mmengine (no mmcv): the configs are parsed, not built (tests/test_mm.py and
tests/test_train_detection.py build them).
"""

import ast
import json
import site
import subprocess
import venv
from pathlib import Path

import pytest

pytest.importorskip("mmengine.config", reason="needs mmengine: pip install -e '.[mm]'")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.py"))


def test_no_config_imports_a_module():
    """A config is data: no ``import`` anywhere in it (mmengine's ``custom_imports`` names the
    modules that register what a config uses)."""
    assert len(CONFIGS) > 80
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in CONFIGS
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert offenders == []


PARSE_ALL = """
import json, pathlib, site, sys
for folder in json.loads(sys.argv[1]):
    site.addsitedir(folder)  # this test's packages (and their .pth files: the editable ovdense)
from mmengine.config import Config
from mmengine.config.utils import PYTHON_ROOT_DIR
parsed = []
for path in json.loads(sys.argv[2]):
    cfg = Config.fromfile(path, import_custom_modules=False)
    parsed.append(cfg.filename)
print(json.dumps({"root": PYTHON_ROOT_DIR, "prefix": sys.prefix, "base": sys.base_prefix, "parsed": parsed}))
"""


def test_every_config_parses_under_a_virtual_environments_interpreter(tmp_path):
    """A fresh ``python -m venv`` (no pip, no packages of its own) whose interpreter is given this
    interpreter's site folders parses every file of configs/ with mmengine's ``Config.fromfile``:
    mmengine there takes the venv as the Python root, as in a user's venv, whether or not this test
    itself runs in one."""
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=False, symlinks=True)
    python = environment / "bin" / "python"
    folders = [folder for folder in [*site.getsitepackages(), site.getusersitepackages()]
               if Path(folder).is_dir()]
    result = subprocess.run(
        [str(python), "-c", PARSE_ALL, json.dumps(folders), json.dumps([str(p) for p in CONFIGS])],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert Path(report["prefix"]) == environment and report["prefix"] != report["base"]  # a real venv
    assert Path(report["root"]) == environment  # what mmengine compares module files with
    assert report["parsed"] == [str(p) for p in CONFIGS]
