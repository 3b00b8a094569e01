"""WinCLIP: windows, window sequences, harmonic aggregation and scores against plain loops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense.anomaly.prompts import state_prompts
from ovdense.anomaly.winclip import WinClip, harmonic_aggregate, window_indices
from ovdense.errors import OvdenseError


def coverage(i, g, k):
    return min(i, g - k) - max(0, i - k + 1) + 1


@pytest.mark.parametrize("grid, k", [((4, 4), 2), ((4, 4), 3), ((15, 15), 2), ((5, 7), 3)])
def test_windows_cover_each_patch_the_right_number_of_times(grid, k):
    windows = window_indices(grid, k)
    gh, gw = grid
    assert windows.shape == ((gh - k + 1) * (gw - k + 1), k * k)
    counts = torch.bincount(windows.flatten(), minlength=gh * gw).view(gh, gw)
    want = torch.tensor([[coverage(y, gh, k) * coverage(x, gw, k) for x in range(gw)] for y in range(gh)])
    assert torch.equal(counts, want)
    assert windows[0].tolist() == [r * gw + c for r in range(k) for c in range(k)]


def test_prompt_sets():
    normal, anomalous = state_prompts("bottle")
    assert (len(normal), len(anomalous)) == (7 * 22, 5 * 22)
    assert "a photo of a broken bottle." in anomalous
    normal, anomalous = state_prompts("bottle", "anomalib")
    assert (len(normal), len(anomalous)) == (7 * 21, 4 * 21)
    assert not any("broken" in p for p in anomalous)


def test_harmonic_aggregation_matches_a_loop():
    windows = window_indices((3, 4), 2)
    scores = torch.rand(2, len(windows), generator=torch.Generator().manual_seed(0)) + 0.05
    got = harmonic_aggregate(scores, windows, 12)
    for b in range(2):
        for p in range(12):
            covering = [scores[b, w] for w in range(len(windows)) if p in windows[w].tolist()]
            want = len(covering) / sum(1.0 / s for s in covering)
            assert got[b, p].item() == pytest.approx(want.item(), rel=1e-5)


def plain_window_embedding(visual, x, patches):
    """One window's sequence built by hand: its patch tokens and the class token, each with
    its full-grid position embedding, through ln_pre, the blocks, ln_post and the projection."""
    grid_tokens = visual.conv1(x).flatten(2).transpose(1, 2)  # 1, P, W
    pos = visual.positional_embedding
    seq = [visual.class_embedding + pos[0]] + [grid_tokens[0, p] + pos[1 + p] for p in patches]
    h = visual.ln_pre(torch.stack(seq)[None])
    for block in visual.transformer.resblocks:
        h = block(h)
    return visual.ln_post(h)[0, 0] @ visual.proj


def test_window_sequences_equal_a_plain_per_window_computation(tiny_backbone):
    winclip = WinClip(tiny_backbone, "bottle", window_batch=5)  # several chunks
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        encoded = winclip.encode(x)
        for windows, feats in zip(winclip.windows, encoded["windows"]):
            assert feats.shape == (2, len(windows), 16)
            for b in range(2):
                for w in (0, len(windows) // 2, len(windows) - 1):
                    want = plain_window_embedding(tiny_backbone.model.visual, x[b:b + 1], windows[w].tolist())
                    torch.testing.assert_close(feats[b, w], want, rtol=1e-4, atol=1e-5)
        pooled = tiny_backbone.model.encode_image(x)
        torch.testing.assert_close(encoded["image"], pooled, rtol=1e-4, atol=1e-5)


def test_zero_and_few_shot_maps_follow_the_formulas(tiny_backbone):
    winclip = WinClip(tiny_backbone, "bottle")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        enc = winclip.encode(x)

        def zs(f):
            logits = F.normalize(f, dim=-1) @ winclip.text.T / 0.07
            return torch.softmax(logits, -1)[..., 1]

        s_img = zs(enc["image"])[0]
        inverse = 1 / s_img
        for windows, feats in zip(winclip.windows, enc["windows"]):
            inverse = inverse + 1 / harmonic_aggregate(zs(feats), windows, 16)
        image, grid = winclip.score(x)
        torch.testing.assert_close(image[0], s_img)
        torch.testing.assert_close(grid.flatten(1), 3 / inverse, rtol=1e-5, atol=1e-6)

    # WinCLIP+: an image scored against a memory that holds it has zero few-shot distance,
    # so its map and image score are half the zero-shot ones
    rng = np.random.default_rng(3)
    references = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)]
    winclip.set_references(references)
    assert winclip.memory["shots"] == 2
    prepared = winclip.prepare(references[:1])
    few_image, few_map = winclip.score(prepared)
    zero_image, zero_map = WinClip(tiny_backbone, "bottle").score(prepared)
    torch.testing.assert_close(few_map, zero_map / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(few_image, zero_image / 2, rtol=1e-4, atol=1e-5)


def test_predict_returns_maps_at_image_size(tiny_backbone, rng):
    winclip = WinClip(tiny_backbone, "bottle")
    images = [(rng.random(size) * 255).astype(np.uint8) for size in ((45, 70, 3), (20, 20, 3))]
    results = winclip.predict(images)
    assert [r.map.shape for r in results] == [(45, 70), (20, 20)]
    assert all(0 <= r.score <= 1 and r.map.dtype == np.float32 for r in results)


def test_bad_input(tiny_backbone):
    with pytest.raises(OvdenseError, match="object name is empty"):
        WinClip(tiny_backbone, " ")
    with pytest.raises(OvdenseError, match="unknown prompt set"):
        WinClip(tiny_backbone, "bottle", prompt_set="mine")
    with pytest.raises(OvdenseError, match="no reference images"):
        WinClip(tiny_backbone, "bottle").set_references([])
