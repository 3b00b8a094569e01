"""COCO RLE against pycocotools."""

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from ovdense.data import rle


@pytest.mark.parametrize("shape, density", [((1, 1), 0.5), ((7, 5), 0.3), ((40, 31), 0.05), ((64, 64), 0.9)])
def test_encode_decode_match_pycocotools(rng, shape, density):
    for _ in range(5):
        mask = rng.random(shape) < density
        mask[rng.integers(0, shape[0]), :] = True  # long runs exercise the difference coding
        ours = rle.encode(mask)
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert ours["size"] == list(theirs["size"])
        np.testing.assert_array_equal(rle.decode(ours), mask)
        np.testing.assert_array_equal(rle.decode(theirs), mask)
        assert rle.area(ours) == int(coco_mask.area(theirs))
        assert rle.bbox(mask) == pytest.approx(coco_mask.toBbox(theirs).tolist())


def test_all_empty_and_all_full():
    for mask in (np.zeros((4, 6), bool), np.ones((4, 6), bool)):
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle.encode(mask)["counts"] == theirs["counts"].decode()
        np.testing.assert_array_equal(rle.decode(rle.encode(mask)), mask)


def test_uncompressed_counts_and_bad_input():
    mask = np.array([[0, 1], [1, 1]], bool)
    np.testing.assert_array_equal(rle.decode({"size": [2, 2], "counts": rle.run_lengths(mask)}), mask)
    with pytest.raises(ValueError, match="sum to"):
        rle.decode({"size": [3, 3], "counts": [1, 2]})
