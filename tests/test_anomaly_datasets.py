"""MVTec AD and VisA readers on the synthetic layouts."""

import numpy as np
import pytest
from PIL import Image

from ovdense.data.anomaly_datasets import (
    iter_mvtec,
    iter_visa,
    load_mask,
    mvtec_categories,
    visa_categories,
)
from ovdense.data.layouts import write_dataset
from ovdense.data.synthetic import DEFECTS, SHAPES
from ovdense.errors import OvdenseError


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomaly")
    return write_dataset("mvtec", root, 2, 0, 48), write_dataset("visa", root, 2, 0, 48)


def test_mvtec(roots):
    mvtec, _ = roots
    assert mvtec_categories(mvtec) == sorted(SHAPES)
    test = list(iter_mvtec(mvtec, "star"))
    assert len(test) == 2 + 2 * len(DEFECTS)
    assert {s.defect for s in test} == {"good", *DEFECTS}
    for sample in test:
        with Image.open(sample.image) as pil:
            size = pil.size[::-1]
        mask = load_mask(sample, size)
        assert mask.any() == bool(sample.label)
    assert all(s.label == 0 for s in iter_mvtec(mvtec, "star", "train"))


def test_visa(roots):
    _, visa = roots
    assert visa_categories(visa) == sorted(SHAPES)
    test = list(iter_visa(visa, "ring"))
    assert sorted(s.label for s in test) == [0, 0, 1, 1]
    for sample in test:
        mask = load_mask(sample, (48, 48))
        assert mask.any() == bool(sample.label)


def test_bad_folders_and_masks(roots, tmp_path):
    mvtec, _ = roots
    with pytest.raises(OvdenseError, match="MVTec AD folder"):
        list(iter_mvtec(mvtec, "hexagon"))
    with pytest.raises(OvdenseError, match="VisA folder"):
        list(iter_visa(tmp_path, "ring"))
    sample = next(s for s in iter_mvtec(mvtec, "star") if s.label)
    with pytest.raises(OvdenseError, match="its image is"):
        load_mask(sample, (10, 10))
    np.testing.assert_array_equal(load_mask(next(iter_mvtec(mvtec, "star", "train")), (3, 4)),
                                  np.zeros((3, 4), bool))
