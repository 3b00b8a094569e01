"""CLIPSeg training with tools/train.py on CPU (``ovdense/mm/clipseg.py``,
``configs/clipseg/clipseg_toy_synthetic.py``): each image's prompt plan, the loss against an
independent computation, exact resume after SIGKILL, checkpoints without the backbone.

Runs train a shrunk decoder (D = 16, FFN 64) on the toy backbone in the synthetic toy world.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import ROOT, kill_after_checkpoint, load_tool, run, train_command

pytest.importorskip("mmcv.ops",
                    reason="needs full mmcv with its compiled ops: python tools/misc/build_mmcv.py")
pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

CONFIG = ROOT / "configs" / "clipseg" / "clipseg_toy_synthetic.py"
ITERS = 6
SMALL_HEAD = dict(reduce_dim=16, mlp=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy world: 8 training scenes (base labels), 3 held-out evaluation scenes."""
    out = tmp_path_factory.mktemp("toy_world")
    return load_tool("data/make_synthetic_benchmarks").write_san_toy(out, num_train=8, num_val=3, seed=0,
                                                                     size=128)


def options(world, cache: Path, **overrides) -> list[str]:
    values = {
        "train_dataloader.dataset.dataset.data_root": str(world["train"]),
        "test_dataloader.dataset.data_root": str(world["eval"]),
        "model.backbone.cache_dir": str(cache),
        **{f"model.head.{k}": v for k, v in SMALL_HEAD.items()},
        "train_dataloader.batch_size": "4",
        "train_cfg.max_iters": str(ITERS),
        "default_hooks.checkpoint.interval": "2",
        "default_hooks.checkpoint.max_keep_ckpts": "10",
        "default_hooks.logger.interval": "1",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return [f"{k}={v}" for k, v in values.items()]


def _parse(items) -> dict:
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def model_and_batch(world, tmp_path_factory):
    """The segmentor of the toy config (small head) and a packed batch of the eight training scenes."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.datasets.transforms import PackSegInputs
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(_parse(options(world, tmp_path_factory.mktemp("cache"))))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    images = sorted((Path(world["train"]) / "images" / "train2017").glob("*.jpg"))  # 8
    batch = {"inputs": [], "data_samples": []}
    for draw, path in enumerate(images):
        bgr = np.array(Image.open(path).convert("RGB"))[..., ::-1].copy()
        labels = np.array(Image.open(Path(world["train"]) / "annotations" / "train2017"
                                     / f"{path.stem}_labelTrainIds.png")).astype(np.int64)
        packed = PackSegInputs()(dict(img=bgr, gt_seg_map=labels, seg_fields=["gt_seg_map"],
                                      img_shape=bgr.shape[:2], ori_shape=bgr.shape[:2]))
        packed["data_samples"].set_metainfo(dict(draw=draw, seed=0))
        batch["inputs"].append(packed["inputs"])
        batch["data_samples"].append(packed["data_samples"])
    return model, batch


def test_prompt_plan_follows_the_labels_and_the_seed(model_and_batch):
    """A positive prompt names a class the image shows (background never), a negative one a class
    it does not; a visual prompt comes from another image that shows the class; the text weight
    is within [0, 0.5]; the plan depends on (seed, draw) only."""
    model, batch = model_and_batch
    data = model.data_preprocessor(batch, training=True)
    samples = data["data_samples"]
    plans = [model.prompts(samples) for _ in range(2)]
    assert plans[0] == plans[1]
    shows = [set(torch.unique(s.gt_sem_seg.data).tolist()) - {0, 255} for s in samples]
    for b, p in enumerate(plans[0]):
        assert p["cls"] != 0
        if p["target_class"] is None:
            assert p["cls"] not in shows[b]
        else:
            assert p["cls"] == p["target_class"] and p["cls"] in shows[b]
        assert p["text"] == f"a photo of a {model.vocabulary.names[p['cls']]}"
        if p["support"] is not None:
            assert p["support"] != b and p["cls"] in shows[p["support"]] and 0 <= p["weight"] <= 0.5
        else:
            assert p["weight"] == 1.0
    for sample in samples:  # another draw, another plan
        sample.set_metainfo(dict(draw=sample.metainfo["draw"] + 100))
    assert model.prompts(samples) != plans[0]


def test_loss_is_the_binary_cross_entropy_of_the_planned_targets(model_and_batch):
    """The loss against one computed here: the head's logits for the planned prompt vectors (text
    mixed with the support's engineered image prompt), a target built from the label map by hand
    (the class's pixels; nothing for a negative), label-255 pixels left out of the mean."""
    from ovdense.heads.clipseg import engineer_prompt, text_prompt_vectors

    model, batch = model_and_batch
    data = model.data_preprocessor(batch, training=True)
    x, samples = data["inputs"], data["data_samples"]
    plan = model.prompts(samples)
    got = model.loss(x, samples)["loss_bce"]
    with torch.no_grad():
        cond = text_prompt_vectors(model.backbone, [p["text"] for p in plan])
        for b, p in enumerate(plan):
            if p["support"] is not None:
                gt = samples[p["support"]].gt_sem_seg.data[0]
                image = engineer_prompt(x[p["support"]], gt == p["cls"])[None]
                visual = model.head.image_prompt_vectors(model.backbone, image)[0]
                cond[b] = p["weight"] * cond[b] + (1 - p["weight"]) * visual
        logits = model.head(model.head.taps(model.backbone, x), cond, (16, 16))  # B, 128, 128
    total, count = 0.0, 0
    for b, p in enumerate(plan):
        gt = samples[b].gt_sem_seg.data[0].numpy()
        target = (gt == p["cls"]) if p["target_class"] is not None else np.zeros_like(gt, bool)
        keep = gt != 255
        z, t = logits[b].numpy()[keep].astype(np.float64), target[keep].astype(np.float64)
        total += float(np.sum(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
        count += int(keep.sum())
    assert abs(float(got.detach()) - total / count) <= 1e-5 * max(1.0, total / count)
    assert any(p["support"] is not None for p in plan)  # the visual path was exercised


def test_the_loss_falls_on_a_repeated_batch(model_and_batch):
    """Eight AdamW steps (1e-3) on one fixed batch through the segmentor's loss (each step draws the
    same plan: the draws are fixed)."""
    model, batch = model_and_batch
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        data = model.data_preprocessor(batch, training=True)
        loss = model.loss(data["inputs"], data["data_samples"])["loss_bce"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    # measured: 0.631 → 0.567 over 8 steps, falling at every one
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.93 * losses[0], losses


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
