"""CLIPSeg training with tools/train.py on CPU (``ovdense/mm/clipseg.py``,
``configs/clipseg/clipseg_toy_synthetic.py``): each sample's prompt plan against its label map, the
loss against an independent computation, exact resume after SIGKILL, two processes equal to one,
checkpoints without the backbone.

Runs train a shrunk decoder (D = 16, FFN 64) on the toy backbone in the synthetic toy world.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import ROOT, kill_after_checkpoint, load_tool, run, short_run_options, torchrun, train_command

pytest.importorskip("mmcv.ops",
                    reason="needs full mmcv with its compiled ops: python tools/misc/build_mmcv.py")
pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

CONFIG = ROOT / "configs" / "clipseg" / "clipseg_toy_synthetic.py"
ITERS = 6
SMALL_HEAD = dict(reduce_dim=16, mlp=64)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255  # ImageNet's statistics, CLIPSeg's input
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy world: 8 training scenes (base labels), 3 held-out evaluation scenes."""
    out = tmp_path_factory.mktemp("toy_world")
    return load_tool("data/make_synthetic_benchmarks").write_san_toy(out, num_train=8, num_val=3, seed=0,
                                                                     size=128)


def options(world, cache: Path, **overrides) -> list[str]:
    return short_run_options(ITERS, {
        "train_dataloader.dataset.dataset.data_root": str(world["train"]),
        "test_dataloader.dataset.data_root": str(world["eval"]),
        "model.backbone.cache_dir": str(cache),
        **{f"model.head.{k}": v for k, v in SMALL_HEAD.items()},
        "train_dataloader.batch_size": "4",
    }, overrides)


def _parse(items) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


def head_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    """The toy config's segmentor (small head) and its training dataset (``ClipSegPromptDataset``)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(_parse(options(world, tmp_path_factory.mktemp("cache"))))
    torch.manual_seed(0)
    return MODELS.build(cfg.model), DATASETS.build(cfg.train_dataloader.dataset), cfg


@pytest.fixture(scope="module")
def batch(built):
    """Eight samples as one process draws them for a batch (keys ``(index, draw, seed=0)``)."""
    from mmengine.dataset import pseudo_collate

    _, dataset, _ = built
    return pseudo_collate([dataset[(i, 40 + i, 0)] for i in range(8)])


def raw_sample(cfg, index: int, draw: int, seed: int = 0) -> dict:
    """The sample the plan is made for, through ``SeededDataset`` (the pipeline under (seed, draw))."""
    from mmseg.registry import DATASETS

    from ovdense.mm.training import SeededDataset

    return SeededDataset(DATASETS.build(cfg.train_dataloader.dataset.dataset))[(index, draw, seed)]


def label_file(world, dataset, index: int) -> np.ndarray:
    return np.array(Image.open(dataset.dataset.get_data_info(index)["seg_map_path"]))


def test_prompt_plan_follows_the_labels_and_the_seed(built, world):
    """A positive prompt names a class the crop shows (background never) and its target is that
    class's pixels; a negative one names a class the crop does not show, its target empty; ignored
    pixels stay ignored; a visual prompt comes from another image whose label map shows the class,
    with a non-empty mask; the text weight is within [0, 0.5]; the plan is a function of
    (index, draw, seed) alone — the same key gives the same sample in any order."""
    _, dataset, cfg = built
    keys = [(i % 8, 100 + i, 3) for i in range(24)]
    seen = {"negative": 0, "visual": 0, "text only": 0}
    plans = []
    for key in keys:
        data = dataset[key]
        raw = raw_sample(cfg, *key)["data_samples"].gt_sem_seg.data[0]  # the crop's labels
        sample = data["data_samples"]
        plan = sample.metainfo["clipseg_prompt"]
        plans.append(plan)
        target = sample.gt_sem_seg.data[0]
        shows = set(torch.unique(raw).tolist()) - {0, 255}
        assert plan["cls"] != 0 and plan["text"] == f"a photo of a {dataset.names[plan['cls']]}"
        assert torch.equal(target == 255, raw == 255)
        if plan["negative"]:
            seen["negative"] += 1
            assert plan["cls"] not in shows and not bool((target == 1).any())
        else:
            assert plan["cls"] in shows
            assert torch.equal(target == 1, raw == plan["cls"])
        if plan["support"] is not None:
            seen["visual"] += 1
            assert plan["support"] != key[0] and 0 <= plan["weight"] <= 0.5
            assert plan["cls"] in np.unique(label_file(world, dataset, plan["support"]))
            assert sample.support_mask.any() and sample.support_mask.shape == sample.support_inputs.shape[1:]
        else:
            seen["text only"] += 1
            assert plan["weight"] == 1.0 and "support_inputs" not in sample
    assert all(seen.values()), seen  # every kind of prompt was drawn
    again = [dataset[key] for key in reversed(keys)][::-1]  # another order, another process
    for data, plan in zip(again, plans):
        assert data["data_samples"].metainfo["clipseg_prompt"] == plan
    other = [dataset[(i, d + 1000, s)]["data_samples"].metainfo["clipseg_prompt"] for i, d, s in keys]
    assert other != plans


def test_text_only_prob_sets_the_share_of_prompts_without_a_visual_prompt(built, world):
    """Among prompts whose class another training scene shows (read from the label files):
    with ``text_only_prob`` 0 every one gets a visual prompt, with 1 none does, and the toy
    config's 0.2 leaves about a fifth text-only; a class no other scene shows is always text."""
    from mmseg.registry import DATASETS

    _, _, cfg = built
    shows = {}
    shares = {}
    for prob in (0.0, 1.0, 0.2):
        dataset = DATASETS.build({**cfg.train_dataloader.dataset, "text_only_prob": prob})
        if not shows:
            shows = {i: set(np.unique(label_file(world, dataset, i)).tolist()) for i in range(len(dataset))}
        with_others = without = 0
        for draw in range(96):
            index = draw % 8
            plan = dataset[(index, draw, 0)]["data_samples"].metainfo["clipseg_prompt"]
            if any(plan["cls"] in shows[j] for j in shows if j != index):
                with_others += 1
                without += plan["support"] is None
            else:
                assert plan["support"] is None
        shares[prob] = without / with_others
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0 and 0.05 <= shares[0.2] <= 0.4, shares


def test_the_class_index_lists_the_scenes_of_each_class_and_is_kept_in_index_file(built, world, tmp_path):
    """The class → scenes index equals one read from the label files here (label 255 left out);
    with ``index_file`` it is written, and a second dataset reads it back instead of the label maps."""
    from mmseg.registry import DATASETS

    _, dataset, cfg = built
    want: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        for label in np.unique(label_file(world, dataset, i)).tolist():
            if label != 255:
                want.setdefault(int(label), []).append(i)
    assert dataset.index == want
    cache = tmp_path / "index.json"
    first = DATASETS.build({**cfg.train_dataloader.dataset, "index_file": str(cache)})
    assert first.index == want and cache.is_file()
    data = json.loads(cache.read_text())
    data["index"] = {"1": [0]}  # a second dataset must take the file's word for it
    cache.write_text(json.dumps(data))
    second = DATASETS.build({**cfg.train_dataloader.dataset, "index_file": str(cache)})
    assert second.index == {1: [0]}


def test_loss_is_the_binary_cross_entropy_of_the_planned_targets(built, batch):
    """The loss against one computed here: the support image normalised by hand (BGR → RGB,
    ImageNet's mean and std), padded, engineered, its class token mixed with the text's vector by
    the planned weight; the head's logits for those vectors; the target and the ignored pixels read
    from the sample; BCE averaged per image, then over images."""
    from ovdense.heads.clipseg import engineer_prompt, text_prompt_vectors

    model, _, _ = built
    data = model.data_preprocessor(batch, training=True)
    x, samples = data["inputs"], data["data_samples"]
    got = model.loss(x, samples)["loss_bce"]
    plans = [s.metainfo["clipseg_prompt"] for s in samples]
    with torch.no_grad():
        cond = text_prompt_vectors(model.backbone, [p["text"] for p in plans])
        for b, p in enumerate(plans):
            if p["support"] is None:
                continue
            bgr = samples[b].support_inputs.permute(1, 2, 0).numpy().astype(np.float64)  # h, w, 3
            rgb = (bgr[..., ::-1] - IMAGENET_MEAN) / IMAGENET_STD
            canvas = np.zeros((128, 128, 3))
            mask = np.zeros((128, 128), bool)
            h, w = rgb.shape[:2]
            canvas[:h, :w], mask[:h, :w] = rgb, samples[b].support_mask.numpy()
            image = engineer_prompt(torch.from_numpy(canvas).permute(2, 0, 1).float(), torch.from_numpy(mask))
            visual = model.head.image_prompt_vectors(model.backbone, image[None])[0]
            cond[b] = p["weight"] * cond[b] + (1 - p["weight"]) * visual
        logits = model.head(model.head.taps(model.backbone, x), cond, (16, 16))  # B, 128, 128
    means = []
    for b in range(len(plans)):
        gt = samples[b].gt_sem_seg.data[0].numpy()
        keep = gt != 255
        z, t = logits[b].numpy()[keep].astype(np.float64), (gt[keep] == 1).astype(np.float64)
        means.append(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    assert abs(float(got.detach()) - np.mean(means)) <= 1e-5 * max(1.0, np.mean(means))
    assert any(p["support"] is not None for p in plans)  # the visual path was exercised
    assert any(p["negative"] for p in plans) and any(not p["negative"] for p in plans)


def test_the_loss_falls_on_a_repeated_batch(built, batch):
    """Eight AdamW steps (1e-3) on one fixed batch through the segmentor's loss."""
    model, _, _ = built
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        data = model.data_preprocessor(batch, training=True)
        loss = model.loss(data["inputs"], data["data_samples"])["loss_bce"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.93 * losses[0], losses


def test_a_sample_naming_its_phrase_is_scored_for_that_phrase_alone(built, world):
    """A test sample whose metainfo has ``phrase`` (a phrase-grounding layout) gets that phrase's
    probability at the image's size — the text as written, commas included — computed here from
    the head's logits by hand; one without it gets the test vocabulary's classes."""
    from mmseg.structures import SegDataSample

    from ovdense.heads.clipseg import text_prompt_vectors

    model, _, _ = built
    path = sorted((Path(world["eval"]) / "images" / "validation").glob("*.jpg"))[0]
    rgb = np.array(Image.open(path).convert("RGB"))  # 128, 128, 3 (the head's input size)
    image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    phrase = "red circle, left of the blue square"
    samples = [SegDataSample(metainfo=dict(phrase=phrase, ori_shape=rgb.shape[:2], img_shape=rgb.shape[:2])),
               SegDataSample(metainfo=dict(ori_shape=rgb.shape[:2], img_shape=rgb.shape[:2]))]
    out = model.predict([image, image], samples)
    with torch.no_grad():
        mean, std = (torch.tensor(v).view(1, 3, 1, 1).float() for v in (IMAGENET_MEAN, IMAGENET_STD))
        x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std
        cond = text_prompt_vectors(model.backbone, [phrase])
        expected = model.head(model.head.taps(model.backbone, x), cond, (16, 16)).sigmoid()  # 1, 128, 128
    assert out[0].seg_logits.data.shape == (1, 128, 128)
    assert float((out[0].seg_logits.data - expected).abs().max()) <= 1e-5
    assert torch.equal(out[0].pred_sem_seg.data, (expected >= 0.5).long())
    assert out[1].seg_logits.data.shape == (31, 128, 128)  # background + the 30 pairs


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    work = tmp_path_factory.mktemp("reference")
    result = run(train_command(CONFIG, work, options(world, work / "cache")), cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (work / f"iter_{ITERS}.pth").is_file() and (work / "clipseg_head.safetensors").is_file()
    return work


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(world, reference, tmp_path):
    work = tmp_path / "killed"
    opts = options(world, work / "cache")
    kill_after_checkpoint(train_command(CONFIG, work, opts), tmp_path, work / "iter_2.pth", 240)
    assert not (work / f"iter_{ITERS}.pth").exists(), "killed too late: the run had finished"
    result = run(train_command(CONFIG, work, opts, "--resume"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = torch.load(work / f"iter_{ITERS}.pth", map_location="cpu", weights_only=True)
    straight = torch.load(reference / f"iter_{ITERS}.pth", map_location="cpu", weights_only=True)
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_two_processes_train_to_the_weights_of_one(world, reference, tmp_path):
    """torchrun, 2 processes × 2 images (gloo, CPU) against 1 process × 4 images: same global
    batch, same draws and prompts (visual prompts come from the dataset, not the batch), same
    weights up to float rounding (gradients are averaged in another order)."""
    pytest.importorskip("torch.distributed.run")
    work = tmp_path / "two"
    opts = options(world, work / "cache", **{"train_dataloader.batch_size": 2})
    run(torchrun(str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir", str(work),
                 "--cfg-options", *opts), cwd=tmp_path, check=True)
    one, two = head_weights(reference / f"iter_{ITERS}.pth"), head_weights(work / f"iter_{ITERS}.pth")
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - head_weights(reference / "iter_2.pth")[k]).abs().max()) for k in one)
    print(f"max abs difference, 2 processes vs 1 after {ITERS} iterations: {worst:.3g} "
          f"(the weights moved up to {moved:.3g} since iteration 2)")
    # Adam divides by the gradient's own size, so where a gradient is near zero its rounding shows
    # in the step: measured 9.6e-6 against a move of 4e-3
    assert worst <= 5e-5 and moved > 1e-3  # equal, and training did change the weights


def test_checkpoints_hold_the_head_only_and_export_it(reference):
    from ovdense import create_backbone
    from ovdense.heads.clipseg import load_head

    state = torch.load(reference / f"iter_{ITERS}.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("head.") for k in state), sorted(state)[:5]
    backbone = create_backbone("toy", cache_dir=reference / "cache")
    head = load_head(reference / "clipseg_head.safetensors", backbone)
    assert head.config.reduce_dim == 16 and head.config.image_size == 128
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[f"head.{key}"]), key
    early = torch.load(reference / "iter_2.pth", map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(state["head.film_mul.weight"], early["head.film_mul.weight"])  # it trained
