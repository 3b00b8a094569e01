"""Every kernel path against the reference on random inputs (Triton under its interpreter)."""

import os

import pytest
import torch
import torch.nn.functional as F

from ovdense import kernels
from ovdense.kernels.cpu import _columns, _rows, bilinear_taps
from ovdense.kernels.reference import dense_classify_reference

PATHS = ["torch", "triton"]


def random_case(B, Q, D, h, w, seed=0, synonyms=False):
    g = torch.Generator().manual_seed(seed)
    patch = F.normalize(torch.randn(B, D, h, w, generator=g), dim=1)
    text = F.normalize(torch.randn(Q, D, generator=g), dim=1)
    class_of_prompt = torch.arange(Q) // 2 if synonyms else torch.arange(Q)
    return patch, text, class_of_prompt


def test_interpreter_is_on_for_cpu_runs():
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@pytest.mark.parametrize("in_size, out_size", [(1, 5), (5, 23), (7, 7), (14, 224), (9, 4), (3, 1),
                                               (37, 597), (597, 683)])
def test_bilinear_taps_are_pytorch_weights(in_size, out_size):
    """The taps' weights are F.interpolate's own: resizing the identity reads them out."""
    eye = torch.eye(in_size)[:, None, None, :]  # in, 1, 1, in: row i is the unit vector e_i
    want = F.interpolate(eye, size=(1, out_size), mode="bilinear", align_corners=False)[:, 0, 0].T
    i0, i1, w0, w1 = bilinear_taps(in_size, out_size)
    got = torch.zeros(out_size, in_size)
    rows = torch.arange(out_size)
    got.index_put_((rows, i0), w0, accumulate=True)
    got.index_put_((rows, i1), w1, accumulate=True)
    assert torch.equal(got, want), f"{(got != want).sum()} of {want.numel()} weights differ"


@pytest.mark.parametrize("shape, size", [((2, 5, 28, 37), (448, 597)), ((1, 3, 7, 9), (100, 131)),
                                         ((1, 4, 1, 1), (5, 3)), ((1, 2, 30, 20), (11, 7)),
                                         ((1, 200, 6, 5), (50, 40))])
def test_columns_then_rows_is_f_interpolate(shape, size):
    """PyTorch's resize of the columns, then the rows by taps, give F.interpolate's values to
    rounding (PyTorch's kernel picks its order of fused multiply–adds by shape, so bit
    equality is not promised). The last case is large enough for the broadcast runs."""
    x = torch.randn(*shape)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = _rows(_columns(x, size[1]), bilinear_taps(shape[2], size[0]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k, r", [(6, 50), (50, 6), (7, 7), (1, 9)])
def test_row_runs_equal_row_gathers(k, r):
    """The broadcast runs (large inputs) compute exactly what gathering the rows computes."""
    wide = torch.randn(300, k, 70)  # 21 000 values per row: the run path
    taps = bilinear_taps(k, r)
    i0, i1, a0, a1 = taps
    gathered = wide[:, i1] * a1[:, None]
    gathered.addcmul_(wide[:, i0], a0[:, None])
    assert torch.equal(_rows(wide, taps), gathered)
    assert torch.equal(_rows(wide[:2], taps), gathered[:2])  # small: the gather path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B, Q, h, w, H, W, synonyms, bg", [
    (1, 1, 3, 4, 17, 29, False, None),  # a single class
    (2, 7, 5, 3, 23, 11, True, None),  # B > 1, odd non-square sizes, synonyms
    (1, 5, 1, 1, 6, 9, False, 0.999),  # a 1×1 grid, background threshold
    (1, 40, 4, 6, 13, 31, True, 0.6),  # several prompt blocks
    (1, 3, 6, 5, 4, 3, False, None),  # downsampling
])
def test_dense_classify_matches_reference(path, B, Q, h, w, H, W, synonyms, bg):
    patch, text, cop = random_case(B, Q, 8, h, w, synonyms=synonyms)
    want_labels, want_scores = dense_classify_reference(patch, text, cop, (H, W), 40.0, bg)
    labels, scores = kernels.dense_classify(patch, text, cop, (H, W), 40.0, bg, kernel=path)
    assert labels.dtype == torch.int64 and labels.shape == (B, H, W)
    torch.testing.assert_close(labels, want_labels, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)
    if bg is not None:
        assert (labels == 0).any() and (scores < bg).any()


def test_torch_path_in_small_chunks_matches_reference():
    patch, text, cop = random_case(2, 11, 8, 6, 7, seed=3, synonyms=True)
    want = dense_classify_reference(patch, text, cop, (50, 45), 60.0, 0.2)
    low = torch.einsum("bdhw,qd->bqhw", patch, text)
    got = kernels.cpu.classify_low(low, cop, (50, 45), 60.0, 0.2, chunk_elements=11 * 45 * 2 * 3)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)


def test_class_probability_tiles_match_reference():
    patch, text, cop = random_case(1, 9, 8, 4, 5, seed=4, synonyms=True)
    logits = F.interpolate(torch.einsum("bdhw,qd->bqhw", patch, text), size=(21, 19), mode="bilinear")
    want = kernels.reference.class_max(torch.softmax(40.0 * logits, dim=1), cop, 5)
    seen = 0
    for r0, r1, probs in kernels.iter_class_probabilities(patch, text, cop, (21, 19), 40.0,
                                                          chunk_elements=9 * 19 * 4):
        torch.testing.assert_close(probs, want[:, :, r0:r1], atol=1e-6, rtol=1e-5)
        seen += r1 - r0
    assert seen == 21


def random_windows(Q, canvas, crop, stride, p, seed=0):
    from ovdense.heads.training_free import window_boxes

    g = torch.Generator().manual_seed(seed)
    windows = []
    for y1, y2, x1, x2 in window_boxes(*canvas, crop, stride):
        hp, wp = -(-(y2 - y1) // p) * p, -(-(x2 - x1) // p) * p
        offset = ((hp - (y2 - y1)) // 2, (wp - (x2 - x1)) // 2)
        low = torch.randn(Q, hp // p, wp // p, generator=g) * 0.2
        windows.append(kernels.Window((y1, y2, x1, x2), low, (hp, wp), offset))
    return windows


@pytest.mark.parametrize("Q, canvas, crop, stride, out, bg", [
    (5, (40, 64), 32, 16, (50, 77), None),
    (3, (30, 45), 24, 10, (30, 45), 0.4),  # windows need padding; canvas = output size
    (4, (20, 20), 32, 16, (33, 17), None),  # one window larger than the image
    (1, (16, 40), 16, 8, (9, 30), None),
])
def test_slide_classify_matches_the_full_canvas(Q, canvas, crop, stride, out, bg):
    windows = random_windows(Q, canvas, crop, stride, p=8)
    cop = torch.arange(Q)
    want = kernels.slide_classify(windows, canvas, out, cop, 30.0, bg, kernel="reference")
    got = kernels.slide_classify(windows, canvas, out, cop, 30.0, bg, kernel="torch")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    got = kernels.cpu.slide_classify(windows, canvas, out, cop, 30.0, bg, chunk_elements=Q * 80 * 2)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_mask_pool_matches_a_loop_and_handles_empty_masks():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 6, 4, 5, generator=g)
    masks = torch.rand(2, 3, 16, 20, generator=g) > 0.6
    masks[1, 2] = False  # empty
    pooled, valid = kernels.mask_pool(features, masks)
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    for b in range(2):
        for m in range(3):
            weight = masks[b, m].float().reshape(4, 4, 5, 4).mean(dim=(1, 3))  # per 4×4 cell
            if weight.sum() == 0:
                assert torch.equal(pooled[b, m], torch.zeros(6))
                continue
            want = (features[b] * weight).sum(dim=(1, 2)) / weight.sum()
            torch.testing.assert_close(pooled[b, m], want, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(pooled).any()
    empty, none_valid = kernels.mask_pool(features, masks[:, :0])
    assert empty.shape == (2, 0, 6) and none_valid.shape == (2, 0)


def test_roi_pool_reads_the_box_region():
    features = torch.zeros(1, 2, 8, 8)
    features[0, :, 2:6, 4:8] = torch.tensor([3.0, -1.0]).view(2, 1, 1)
    boxes = torch.tensor([[0.0, 40.0, 20.0, 64.0, 44.0]])  # image 64×64: cells x 5..8, y 2.5..5.5
    out = kernels.roi_pool(features, boxes, (64, 64), output_size=2)
    assert out.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out[0, :, :, :].mean(dim=(1, 2)), torch.tensor([3.0, -1.0]))
    with pytest.raises(ValueError, match="aspect"):
        kernels.roi_pool(features, boxes, (64, 32))


def test_unknown_kernel():
    from ovdense.errors import OvdenseError

    with pytest.raises(OvdenseError, match="unknown kernel"):
        kernels.resolve_kernel("cuda-magic", torch.device("cpu"))
