"""AdaptCLIP (ovdense/anomaly/adaptclip.py, ovdense/train/adaptclip.py) against the official code
(gaobb/AdaptCLIP's test.py and train.py run as is, tests/official_adaptclip.py) on the same random tiny
ViT-L/14-shaped CLIP and the same random adapters, saved in the official layout and read through
tools/model_converters/adaptclip2ovdense.py; the Gaussian smoothing against scipy; the losses against the
official loss classes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "model_converters"))

import adaptclip2ovdense as converter  # noqa: E402
import official_adaptclip as oa  # noqa: E402

from ovdense import create_backbone  # noqa: E402
from ovdense.anomaly import adaptclip as ac  # noqa: E402
from ovdense.anomaly.adaptclip import AdaptClip, AdaptClipConfig, AdaptClipHead  # noqa: E402
from ovdense.errors import OvdenseError  # noqa: E402
from ovdense.io import load_image  # noqa: E402
from ovdense.train import adaptclip as training  # noqa: E402

SIZE = 112  # the adapters' input side: an 8 x 8 grid of the tiny CLIP's 14 px patches (native 4 x 4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The official code, a random tiny CLIP (open_clip, saved, read by ``create_backbone``), random
    official adapters saved as ``train.py`` saves them and converted, and a small MVTec-style dataset."""
    import open_clip

    root = tmp_path_factory.mktemp("adaptclip")
    official = oa.import_adaptclip(root / "official")
    torch.manual_seed(0)
    model = open_clip.CLIP(**oa.CONFIG).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # attention far from uniform, so that q-k and v-v paths differ
        for name, p in model.visual.named_parameters():
            if name.endswith("in_proj_weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    (root / "tiny.json").write_text(json.dumps(oa.CONFIG))
    torch.save(model.state_dict(), root / "tiny.pt")
    backbone = create_backbone(str(root / "tiny.json"), pretrained=str(root / "tiny.pt"),
                               cache_dir=root / "cache")
    adapters = oa.random_adapters(official, oa.official_model(official, model.state_dict()), SIZE, generator)
    torch.save(adapters, root / "epoch_15.pth")
    head = converter.convert(root / "epoch_15.pth", root / "head", backbone, image_size=SIZE)
    data = oa.write_mvtec(root / "data", {"bottle": dict(train=3, good=2, defect=3, seed=0),
                                          "nut": dict(train=3, good=2, defect=2, seed=1)})
    return types.SimpleNamespace(root=root, official=official, model=model, backbone=backbone,
                                 adapters=adapters,
                                 head=head, data=data)


def official_run(setup, shots: int) -> dict:
    model = oa.official_model(setup.official, setup.model.state_dict())  # DAPM_replace changes it: one a run
    args = oa.test_args(setup.data, setup.root / "epoch_15.pth", setup.root / f"out{shots}", shots, SIZE)
    return oa.run_official_test(setup.official, model, args)


@pytest.mark.parametrize("shots", [0, 2])
def test_maps_and_scores_match_official(setup, shots):
    """test.py's maps and image scores (the dual path, the three adapters, the fusion, σ = 4), zero- and
    2-shot (references: the ones the official PromptDataset drew, listed in its prompts file)."""
    theirs = official_run(setup, shots)
    paths = list(theirs["query_paths"])
    head = AdaptClip(setup.backbone, "bottle", head_checkpoint=setup.head)
    for category in ("bottle", "nut"):
        index = [i for i, p in enumerate(paths) if f"/{category}/" in p]
        if shots:
            listed = (setup.root / f"out{shots}" / f"mvtec_10seed_{shots}shot_test_prompts.txt")
            listed = listed.read_text().split()
            head.set_references([setup.data / p for p in listed if p.startswith(category + "/")])
            assert head.shots == shots
        scores, maps = head.score(head.prepare([load_image(paths[i]) for i in index]))
        assert maps.shape == (len(index), SIZE, SIZE)
        assert torch.allclose(maps, theirs["pr_masks"][index], atol=1e-6, rtol=0)
        assert torch.allclose(scores, theirs["pr_anomalys"][index], atol=1e-6, rtol=0)
        assert maps.std() > 1e-3 and scores.std() > 1e-4  # maps that vary: the comparison has teeth


def test_training_step_matches_official(setup):
    """train.py run as is for one step (batch = the whole training set: the test split of the training
    dataset, each query with one random normal image): ovdense's losses on the batch it drew, from the
    adapters it built, give its gradients; on the official image tower's features to rounding, on
    ovdense's own tower to the rounding that batch-norm of near-constant random features amplifies."""
    model = oa.official_model(setup.official, setup.model.state_dict())
    args = oa.train_args(setup.data, setup.root / "train", 9, SIZE)
    record = oa.run_official_train(setup.official, model, args)
    assert len(record.batches) == 1 and len(record.grads) == 1
    state, found = converter.map_state(record.initial)
    head = AdaptClipHead(setup.backbone, AdaptClipConfig(image_size=SIZE, **found["fields"])).train()
    batch = record.batches[0]
    masks = (batch["img_mask"].squeeze(1) > 0.5).float()
    static = ac.static_text(setup.backbone)

    def gradients(encode=None):
        head.load_state_dict(state)
        head.zero_grad()
        if encode is not None:
            saved, training.encode_image = training.encode_image, encode
        try:
            out = training.losses(setup.backbone, head, static, batch["img"], batch["prompt_img"], masks,
                                  batch["anomaly"])
        finally:
            if encode is not None:
                training.encode_image = saved
        (out["loss_local"] + out["loss_global"]).backward()
        return {name: p.grad.clone() for name, p in head.named_parameters()}

    def official_name(name: str) -> str:
        part, rest = name.split(".", 1)
        if part == "textual_learner":
            return {"ctx_pos": "ctx_normal", "ctx_neg": "ctx_anomalous"}[rest]
        if part == "visual_learner":
            side = "visual_global." if rest.startswith("global_adapter") else "visual_local."
            return side + rest.split(".", 1)[1]
        if rest.startswith("sharebn."):
            return "prompt_query.norms." + rest[len("sharebn."):]
        kind, _, tail = rest.split(".", 2)
        return f"prompt_query.{'local_head' if kind == 'local_adapter' else 'global_head'}.{tail}"

    theirs = record.grads[0]
    assert {official_name(k) for k in theirs} == {n for n, _ in head.named_parameters()}

    def worst(mine):
        return max(((mine[official_name(k)].reshape(v.shape) - v).abs().max() / v.abs().max()).item()
                   for k, v in theirs.items())

    @torch.no_grad()  # the model as train.py left it: DAPM_replace done
    def official_features(backbone, x, taps, dual):
        return model.encode_image(x, [6, 12, 18, 24], DPAM_layer=20)

    assert worst(gradients(official_features)) < 1e-4
    assert worst(gradients()) < 2e-2


def test_gaussian_blur_is_scipy():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    for shape, sigma in (((2, 37, 41), 4.0), ((1, 9, 6), 3.0), ((1, 20, 20), 1.5), ((1, 5, 7), 0.7)):
        maps = rng.random(shape).astype(np.float32)
        mine = ac.gaussian_blur(torch.from_numpy(maps), sigma).numpy()
        reference = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
        assert np.abs(mine - reference).max() < 1e-6, (shape, sigma)
    flat = torch.ones(1, 8, 8)
    assert torch.equal(ac.gaussian_blur(flat, 0), flat)


def test_losses_are_the_official_classes(setup):
    lib = setup.official.lib
    generator = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 2, 10, 12, generator=generator), dim=1)
    target = (torch.rand(3, 10, 12, generator=generator) > 0.7).float()
    assert torch.allclose(training.focal_loss(probs, target), lib.FocalLoss()(probs, target), atol=1e-7)
    assert torch.allclose(training.dice_loss(probs[:, 1], target), lib.BinaryDiceLoss()(probs[:, 1], target),
                          atol=1e-7)
    assert training.focal_loss(probs, target) > training.focal_loss(
        torch.stack([1 - target, target], 1).clamp(0.01, 0.99), target)  # a better map costs less


def test_converter_checks_the_layout(setup, tmp_path):
    adapters = setup.adapters
    bad = {k: dict(v) for k, v in adapters.items()}
    bad["pq_learner"]["local_adapter.2.0.weight"] = bad["pq_learner"]["local_adapter.2.0.weight"] + 1
    torch.save(bad, tmp_path / "shared.pth")
    with pytest.raises(converter.ConversionError, match="shares one module"):
        converter.convert(tmp_path / "shared.pth", tmp_path, setup.backbone, image_size=SIZE)
    missing = {k: dict(v) for k, v in adapters.items()}
    del missing["textual_learner"]["ctx_neg"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(converter.ConversionError, match="ctx_neg"):
        converter.convert(tmp_path / "missing.pth", tmp_path, setup.backbone, image_size=SIZE)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(converter.ConversionError, match="textual_learner"):
        converter.convert(tmp_path / "other.pth", tmp_path, setup.backbone, image_size=SIZE)
    toy = create_backbone("toy")
    with pytest.raises(converter.ConversionError, match="shape"):
        converter.convert(setup.root / "epoch_15.pth", tmp_path, toy, image_size=64)
    assert not (tmp_path / converter.HEAD_FILE).exists()  # nothing written by a failed conversion
    # the CLI: a pickled object is refused by torch.load(weights_only=True), with one line
    import pickle

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(types.SimpleNamespace(a=1)))
    assert converter.main([str(tmp_path / "evil.pth"), str(tmp_path), "--backbone", "toy"]) == 2


def test_head_file_and_inputs(setup, tmp_path):
    head = AdaptClip(setup.backbone, head_checkpoint=setup.head)
    assert head.config.image_size == SIZE and head.head.taps == (6, 12, 18, 24) and head.head.dual_from == 6
    # the published sizes: 0.61 M zero-shot, 1.76 M with the prompt-query adapter (ViT-L/14: 768 / 768)
    counts = {name: sum(p.numel() for p in getattr(head.head, name).parameters())
              for name in ("visual_global", "visual_local", "prompt_query")}
    assert counts["visual_global"] == counts["visual_local"] == 768 * 192 * 2 + 2 * 192
    toy = create_backbone("toy")
    with pytest.raises(OvdenseError, match="trained on backbone"):
        AdaptClip(toy, head_checkpoint=setup.head)
    with pytest.raises(OvdenseError, match="not a multiple"):
        AdaptClipHead(toy, AdaptClipConfig(image_size=100))
    with pytest.raises(OvdenseError, match="taps"):
        AdaptClipHead(toy, AdaptClipConfig(image_size=64, taps=(3, 2)))
    with pytest.raises(OvdenseError, match="empty"):
        head.set_references([])
    small = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(OvdenseError, match="different sizes"):
        head.set_references([small, np.zeros((40, 60, 3), np.uint8)])
    head.set_references([small])
    with pytest.raises(OvdenseError, match="queries' size"):
        head.predict(np.zeros((41, 50, 3), np.uint8))
    (result,) = head.predict(small)
    assert result.map.shape == (40, 50) and result.mode == "AdaptCLIP (1-shot)" and result.shots == 1
    (zero,) = AdaptClip(setup.backbone, head_checkpoint=setup.head).predict(small)
    assert zero.mode == "AdaptCLIP (zero-shot)" and 0.0 <= zero.score <= 1.0


def test_dual_path_is_the_official_tower(setup):
    """The image feature (original path, no ln_post) and the v-v taps against the official tower alone, and
    a tower whose dual path starts one block early, which differs."""
    model = oa.official_model(setup.official, setup.model.state_dict())
    model.visual.DAPM_replace(DPAM_layer=20)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        image, patches = model.encode_image(x, [6, 12, 18, 24], DPAM_layer=20)
        mine_image, mine = ac.encode_image(setup.backbone, x, (6, 12, 18, 24), 6)
    for a, b in zip([mine_image, *mine], [image, *patches]):  # 24 fp32 blocks on N(0, 1) pixels
        assert (a - b).abs().max() / b.abs().max() < 1e-4
    with torch.no_grad():
        _, late = ac.encode_image(setup.backbone, x, (6, 12, 18, 24), 5)
    assert (late[0] - patches[0]).abs().max() / patches[0].abs().max() > 1e-2


def test_benchmark_runs_and_writes_its_rows(tmp_path):
    """tools/benchmarks/anomaly.py --adaptclip on the toy CLIP: inference zero- and 1-shot, the training
    step."""
    import csv

    from tool_runs import load_tool

    bench = load_tool("benchmarks/anomaly")
    out = tmp_path / "bench.csv"
    assert bench.main(["--adaptclip", "--adaptclip-model", "toy", "--adaptclip-size", "64", "--batches", "2",
                       "--repeats", "1", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["what"] for r in rows] == ["inference zero-shot", "inference 1-shot", "training step, batch 8"]
    assert all(float(r["seconds_per_image"]) > 0 for r in rows)
