"""WinCLIP: windows, window sequences, harmonic aggregation and scores against plain loops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovdense.anomaly.prompts import PROMPT_SETS, state_prompts
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


def plain_sequences(visual, x, windows):
    """Per list of patch indices, one sequence: the class token and those patches' tokens of
    ``x [1, 3, H, W]``, each with its full-grid position embedding, through ln_pre, the blocks and
    ln_post: ``[n, 1 + len, W]`` (the sequences batched, each on its own)."""
    grid_tokens = visual.conv1(x).flatten(2).transpose(1, 2)[0]  # P, W
    pos = visual.positional_embedding
    h = torch.stack([torch.stack([visual.class_embedding + pos[0]] + [grid_tokens[p] + pos[1 + p] for p in w])
                     for w in windows])
    h = visual.ln_pre(h)
    for block in visual.transformer.resblocks:
        h = block(h)
    return visual.ln_post(h)


def plain_window_embedding(visual, x, patches):
    return plain_sequences(visual, x, [patches])[0, 0] @ visual.proj


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


def reference_text(backbone, object_name, prompt_set):
    """``[t_normal, t_anomalous]``: every state of the set in every template, through the
    backbone's ``encode_text``; per state kind the mean of the raw embeddings, L2-normalised."""
    normal_states, anomalous_states, templates = PROMPT_SETS[prompt_set]
    rows = []
    for states in (normal_states, anomalous_states):
        prompts = [template.format(state.format(object_name)) for state in states for template in templates]
        rows.append(backbone.model.encode_text(backbone.tokenizer(prompts)).float().mean(dim=0))
    return torch.stack(rows) / torch.stack(rows).norm(dim=-1, keepdim=True)


@torch.no_grad()
def reference_winclip(backbone, object_name, prompt_set, images, references=(), scales=(2, 3), T=0.07):
    """WinCLIP and, with ``references``, WinCLIP+ by plain loops, from the paper (§3.2–3.4) and
    nothing of ``ovdense.anomaly``: per RGB image, ``{"zero": (score, map), "few": (score, map)}``
    with ``[gh, gw]`` maps (``"few"`` only with references).

    Images are resized (PIL bicubic) to the native size; a window is its class token through the
    tower; zero-shot ``softmax(cos / T)[anomalous]``, a patch's per-scale score the harmonic mean
    over the windows covering it, ``M_zs = (S + 1) / (1 / s_img + Σ 1 / H_k)``; few-shot, per
    feature ``min over the memory of its kind of (1 − cos) / 2``, ``M_fs`` the mean of the patch
    map and the harmonic window maps, map ``(M_zs + M_fs) / 2``, score ``(s_img + max M_fs) / 2``."""
    visual = backbone.model.visual
    text = reference_text(backbone, object_name, prompt_set)
    gh, gw = backbone.native_grid
    H, W = backbone.native_size
    P = gh * gw
    windows = {k: [[(r + i) * gw + c + j for i in range(k) for j in range(k)]
                   for r in range(gh - k + 1) for c in range(gw - k + 1)] for k in scales}

    def features(rgb):
        resized = np.array(Image.fromarray(np.asarray(rgb)).resize((W, H), Image.BICUBIC))
        x = backbone.normalize(torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255)
        full = plain_sequences(visual, x, [range(P)])[0]  # 1 + P, W
        return {"image": full[0] @ visual.proj, "patches": list(full[1:]),
                **{k: list(plain_sequences(visual, x, windows[k])[:, 0] @ visual.proj) for k in scales}}

    def zero_shot(f):
        cos = F.cosine_similarity(f[None], text, dim=-1)  # 2
        return torch.softmax(cos / T, dim=0)[1].item()

    def distance(f, memory):
        return min((1 - F.cosine_similarity(f, m, dim=0).item()) / 2 for m in memory)

    def harmonic(values, k, p):
        covering = [v for v, w in zip(values, windows[k]) if p in w]
        return len(covering) / sum(1 / v for v in covering)

    memory = [features(r) for r in references]
    results = []
    for rgb in images:
        f = features(rgb)
        s_img = zero_shot(f["image"])
        zs = {k: [zero_shot(e) for e in f[k]] for k in scales}
        zero = [(len(scales) + 1) / (1 / s_img + sum(1 / harmonic(zs[k], k, p) for k in scales))
                for p in range(P)]
        result = {"zero": (s_img, torch.tensor(zero).view(gh, gw))}
        if memory:
            patch_memory = [t for m in memory for t in m["patches"]]
            fs = {k: [distance(e, [t for m in memory for t in m[k]]) for e in f[k]] for k in scales}
            few = [(distance(f["patches"][p], patch_memory) + sum(harmonic(fs[k], k, p) for k in scales))
                   / (len(scales) + 1) for p in range(P)]
            grid = [(z + q) / 2 for z, q in zip(zero, few)]
            result["few"] = ((s_img + max(few)) / 2, torch.tensor(grid).view(gh, gw))
        results.append(result)
    return results


@pytest.mark.parametrize("prompt_set", ["paper", "anomalib"])
def test_scores_equal_an_independent_reference(tiny_backbone, prompt_set):
    """Zero-shot with text embeddings built here, then WinCLIP+ with a memory of two *other*
    images, against ``reference_winclip``."""
    rng = np.random.default_rng(4)
    images = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(3)]
    tests, references = images[:1], images[1:]
    want = reference_winclip(tiny_backbone, "bottle", prompt_set, tests, references)
    winclip = WinClip(tiny_backbone, "bottle", prompt_set=prompt_set)
    for mode in ("zero", "few"):
        if mode == "few":
            winclip.set_references(references)
            assert winclip.memory["shots"] == 2
        scores, grids = winclip.score(winclip.prepare(tests))
        for b, reference in enumerate(want):
            want_score, want_grid = reference[mode]
            assert scores[b].item() == pytest.approx(want_score, rel=1e-4, abs=1e-6), (mode, b)
            torch.testing.assert_close(grids[b], want_grid, rtol=1e-4, atol=1e-6)
    # the few-shot distances are not negligible beside the tolerance: a factor 2 on them shows
    assert all((r["few"][1] - r["zero"][1] / 2).abs().min() > 1e-3 for r in want)


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
