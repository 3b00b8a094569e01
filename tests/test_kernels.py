"""Every kernel path against the reference on random inputs (Triton under its interpreter)."""

import os

import pytest
import torch
import torch.nn.functional as F

from ovdense import kernels
from ovdense.kernels import native
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


CASES = [
    (1, 1, 3, 4, 17, 29, False, None),  # a single class
    (2, 7, 5, 3, 23, 11, True, None),  # B > 1, odd non-square sizes, synonyms
    (1, 5, 1, 1, 6, 9, False, 0.999),  # a 1×1 grid, background threshold
    (1, 40, 4, 6, 13, 31, True, 0.6),  # several prompt blocks
    (1, 3, 6, 5, 4, 3, False, None),  # downsampling
]


@pytest.fixture(params=["fused", "eager"])
def cpu_variant(request, monkeypatch):
    """The torch path with the fused C decision (``native.py``) and without it."""
    if request.param == "eager":
        monkeypatch.setenv("OVDENSE_NATIVE", "0")
    elif not native.available():
        pytest.skip(f"the fused kernel cannot be built here: {native.failure()}")
    return request.param


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B, Q, h, w, H, W, synonyms, bg", CASES)
def test_dense_classify_matches_reference(path, B, Q, h, w, H, W, synonyms, bg):
    patch, text, cop = random_case(B, Q, 8, h, w, synonyms=synonyms)
    want_labels, want_scores = dense_classify_reference(patch, text, cop, (H, W), 40.0, bg)
    labels, scores = kernels.dense_classify(patch, text, cop, (H, W), 40.0, bg, kernel=path)
    assert labels.dtype == torch.int64 and labels.shape == (B, H, W)
    torch.testing.assert_close(labels, want_labels, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)
    if bg is not None:
        assert (labels == 0).any() and (scores < bg).any()


@pytest.mark.parametrize("B, Q, h, w, H, W, synonyms, bg", CASES)
def test_both_cpu_variants_match_reference(cpu_variant, B, Q, h, w, H, W, synonyms, bg):
    patch, text, cop = random_case(B, Q, 8, h, w, seed=1, synonyms=synonyms)
    want_labels, want_scores = dense_classify_reference(patch, text, cop, (H, W), 40.0, bg)
    labels, scores = kernels.dense_classify(patch, text, cop, (H, W), 40.0, bg, kernel="torch")
    assert labels.dtype == torch.int64 and labels.shape == (B, H, W)
    torch.testing.assert_close(labels, want_labels, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("B, Q, h, w, H, W, chunk", [
    (1, 150, 8, 8, 128, 128, 1 << 22),  # a benchmark-like vocabulary, one span
    (2, 300, 5, 7, 61, 93, 300 * 93 * 2),  # spans of two low-resolution rows, B > 1
    (1, 21, 9, 6, 5, 4, 1 << 22),  # downsampling
    (1, 4, 1, 1, 7, 3, 1 << 22),  # one low-resolution cell
])
def test_fused_decision_is_the_eager_one(monkeypatch, B, Q, h, w, H, W, chunk):
    """The C loop computes the eager path's logits with the same roundings: the same labels
    bit for bit, the scores to the contract's 1e-5 (the sums' orders differ)."""
    if not native.available():
        pytest.skip(f"the fused kernel cannot be built here: {native.failure()}")
    g = torch.Generator().manual_seed(7)
    low = torch.randn(B, Q, h, w, generator=g) * 0.3
    cop = torch.arange(Q) // 3
    fused = kernels.cpu.classify_low(low, cop, (H, W), 40.0, 0.3, chunk_elements=chunk)
    monkeypatch.setenv("OVDENSE_NATIVE", "0")
    eager = kernels.cpu.classify_low(low, cop, (H, W), 40.0, 0.3, chunk_elements=chunk)
    assert torch.equal(fused[0], eager[0])
    torch.testing.assert_close(fused[1], eager[1], rtol=0, atol=1e-5)


def test_ties_go_to_the_first_prompt(cpu_variant):
    """Equal logits (the same text twice): the first of them wins, as ``max`` decides."""
    patch, text, _ = random_case(1, 4, 8, 3, 3, seed=2)
    text = torch.cat([text[:2], text[1:2], text[2:]])  # prompts 1 and 2 are equal
    cop = torch.arange(5)
    want = dense_classify_reference(patch, text, cop, (12, 12), 40.0)
    got = kernels.dense_classify(patch, text, cop, (12, 12), 40.0, kernel="torch")
    assert torch.equal(got[0], want[0]) and (got[0] == 1).any() and not (got[0] == 2).any()


def test_scores_at_a_large_logit_scale(cpu_variant):
    """Logit gaps × 100 reach the exponential's underflow (exp(−87)); scores stay within 1e-5."""
    g = torch.Generator().manual_seed(9)
    low = torch.rand(1, 30, 4, 4, generator=g) * 2 - 1  # cosines over all of [−1, 1]
    cop = torch.arange(30)
    up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    want = kernels.reference.classify_reference(up, cop, 100.0)
    got = kernels.cpu.classify_low(low, cop, (16, 16), 100.0)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)


def test_without_a_compiler_the_eager_path_serves(monkeypatch, tmp_path):
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert not native.available() and "no C compiler" in native.failure()
    patch, text, cop = random_case(1, 6, 8, 3, 4, seed=5, synonyms=True)
    want = dense_classify_reference(patch, text, cop, (20, 25), 40.0, 0.3)
    got = kernels.dense_classify(patch, text, cop, (20, 25), 40.0, 0.3)
    assert torch.equal(got[0], want[0])
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").iterdir())


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("OVDENSE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.available(), native.failure()
    (built,) = (tmp_path / "kernels").iterdir()  # the library alone: no temporary left behind
    assert built.suffix == ".so"
    monkeypatch.setenv("OVDENSE_NATIVE", "0")
    assert not native.available()


def _labels_in_child(queue):
    # as torch's DataLoader workers do (_worker_loop): torch's own intra-op pool is not fork-safe
    # here (an einsum in a forked child hung before ovdense's kernel was reached)
    torch.set_num_threads(1)
    patch, text, cop = random_case(1, 6, 8, 5, 5, seed=6)
    queue.put(kernels.dense_classify(patch, text, cop, (40, 40), 40.0, kernel="torch")[0].tolist())


def test_a_forked_child_runs_the_fused_kernel(monkeypatch):
    """The worker threads are per process: a forked child (a data-loader worker) builds its own
    instead of waiting on its parent's, which it does not have."""
    import multiprocessing

    if not native.available():
        pytest.skip(f"the fused kernel cannot be built here: {native.failure()}")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the parent's pool has 2 workers
    patch, text, cop = random_case(1, 6, 8, 5, 5, seed=6)
    want = kernels.dense_classify(patch, text, cop, (40, 40), 40.0, kernel="torch")[0]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_labels_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == want.tolist()


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
def test_slide_classify_matches_the_full_canvas(cpu_variant, Q, canvas, crop, stride, out, bg):
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


def test_decide_taps_equals_the_torch_decision():
    """The C loop with T taps per row against the same decision in torch (taps combined in order,
    scaled, first maximum, 1 / Σ exp): rows of 1 to 3 taps, zero-weight padding, a tie."""
    if not native.available():
        pytest.skip(f"the fused kernel cannot be built here: {native.failure()}")
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(1, 6, 5, 9, generator=g)  # B, Q, K, W
    wide[0, 4] = wide[0, 2]  # prompts 2 and 4 tie everywhere: the first wins
    index = torch.tensor([[0, 1, 2], [3, 0, 0], [1, 4, 0], [2, 3, 4]])
    weight = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.1, 0.6, 0.3]])
    prompt = torch.empty(1, 4, 9, dtype=torch.int64)
    score = torch.empty(1, 4, 9)
    native.decide_taps(wide, (index, weight), 30.0, prompt, score)
    rows = (wide[0][:, index] * weight[None, :, :, None]).sum(dim=2) * 30.0  # Q, r, W
    want = torch.softmax(rows, dim=0)
    torch.testing.assert_close(score[0], want.max(dim=0).values, rtol=0, atol=1e-6)
    assert torch.equal(prompt[0], rows.argmax(dim=0))
    assert not (prompt == 4).any()


@pytest.mark.parametrize("canvas, crop, stride, out", [
    ((448, 597), 448, 224, (512, 683)),  # ClearCLIP's protocol on a 512 × 683 image: one band, 2 windows
    ((70, 90), 48, 20, (60, 80)),  # 3 × 4 windows, canvas larger than the output
    ((40, 56), 24, 16, (40, 56)),  # windows that need padding (offset inside the padded window)
    ((300, 120), 64, 40, (280, 130)),  # 7 × 3 windows, 3 spans of output rows (COMPOSITE_ROWS = 128)
])
def test_grid_windows_compose_both_resizes_exactly(canvas, crop, stride, out):
    """On windows laid out by ``window_boxes`` (a grid), the fused path composes each axis's two resizes
    (``cpu._slide_composite``): labels equal the full canvas's (``kernel="reference"``: the canvas
    built, resized and classified as the official code does), scores within 1e-5; a layout that is
    not a grid (one window removed where another still covers it) takes the canvas path."""
    if not native.available():
        pytest.skip(f"the fused kernel cannot be built here: {native.failure()}")
    Q = 40 if canvas[0] > 100 else 7
    windows = random_windows(Q, canvas, crop, stride, p=16 if canvas[0] > 100 else 8, seed=3)
    cop = torch.arange(Q)
    assert kernels.cpu._slide_composite(windows, canvas, out, 30.0) is not None
    want = kernels.slide_classify(windows, canvas, out, cop, 30.0, None, kernel="reference")
    got = kernels.cpu.slide_classify(windows, canvas, out, cop, 30.0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    if len(windows) > 2:
        fewer = windows[:1] + windows[2:]
        if len({w.box[:2] for w in fewer}) * len({w.box[2:] for w in fewer}) != len(fewer):
            assert kernels.cpu._slide_composite(fewer, canvas, out, 30.0) is None
