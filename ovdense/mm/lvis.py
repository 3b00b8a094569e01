"""LVIS v1 for the OV-LVIS configs: mmdet's dataset and metric, built only with a working ``lvis``.

mmdet 3.3's ``LVISV1Dataset`` and ``LVISMetric`` import the ``lvis`` package. PyPI's lvis 0.5.3 (its
last release) still calls ``np.float`` in ``LVISEval.accumulate``, which NumPy 1.24 removed: the
evaluation would fail after the whole test set has run (lvis-api issue #37, fixed on its main by
PR #42). ``OvdenseLVISV1Dataset`` and ``OvdenseLVISMetric`` check the installed package when they
are built, before any work: where their annotation file exists (the data is about to be used) a
missing or broken ``lvis`` is an ``OvdenseError`` naming the fix; where it does not, a warning with
the same text (mmdet's own error about the missing file follows).

The check lives here, not in the configs: mmengine refuses a config that imports a module outside
the interpreter's prefix, and inside a virtual environment that is every standard-library module
(``mmengine/config/utils.py:_is_builtin_module`` compares with ``dirname(dirname(sys.executable))``).
Configs hold data; ``custom_imports = dict(imports=["ovdense.mm.lvis", ...])`` registers these.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy
from mmdet.datasets import LVISV1Dataset
from mmdet.evaluation.metrics import LVISMetric
from mmdet.registry import DATASETS, METRICS

from ovdense.errors import OvdenseError

# lvis-api's main after PR #42 (np.float removed); PyPI has no release with the fix
LVIS_FIX = ("pip install 'lvis @ git+https://github.com/lvis-dataset/lvis-api.git"
            "@7d7f07def11da91f8b2710ce352c62a78fd5a7ad'")


def lvis_problem() -> str | None:
    """What is wrong with the installed ``lvis`` package for mmdet's LVIS dataset and metric, as one
    message naming the fix, or ``None`` when it works (read from its files: nothing is imported)."""
    spec = importlib.util.find_spec("lvis")
    if spec is None or spec.origin is None:
        return "the OV-LVIS configs need the lvis package (mmdet's LVISV1Dataset and LVISMetric): " + LVIS_FIX
    evaluation = Path(spec.origin).with_name("eval.py")
    if evaluation.is_file() and "np.float)" in evaluation.read_text() and not hasattr(numpy, "float"):
        return (f"the installed lvis ({evaluation.parent}) calls np.float, which NumPy {numpy.__version__} "
                f"no longer has: LVISMetric would fail after the whole test set has run; install "
                f"lvis-api's fixed main: {LVIS_FIX}")
    return None


def check_lvis(ann_file: str | Path | None) -> None:
    """Refuse a missing or broken ``lvis`` when ``ann_file`` exists (LVIS data about to be used);
    only warn when it does not (a config built without its data)."""
    problem = lvis_problem()
    if problem is None:
        return
    if ann_file is not None and Path(ann_file).is_file():
        raise OvdenseError(problem)
    warnings.warn(problem, stacklevel=3)


@DATASETS.register_module()
class OvdenseLVISV1Dataset(LVISV1Dataset):
    """mmdet's ``LVISV1Dataset``, after ``check_lvis`` on its annotation file."""

    def load_data_list(self) -> list[dict]:
        check_lvis(self.ann_file)
        return super().load_data_list()


@METRICS.register_module()
class OvdenseLVISMetric(LVISMetric):
    """mmdet's ``LVISMetric``, after ``check_lvis`` on its annotation file (at build time, so a
    broken ``lvis`` stops a run before training or testing, not after the whole test set)."""

    def __init__(self, ann_file: str | None = None, **kwargs) -> None:
        check_lvis(ann_file)
        super().__init__(ann_file=ann_file, **kwargs)
