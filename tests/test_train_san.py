"""SAN training with tools/train.py on CPU: exact resume after SIGKILL, two processes against
one, a non-finite loss, a falling loss, checkpoints without the backbone, and tools/test.py's
metric against an independent computation.

Every run trains a shrunk SAN (side ViT width 48, 4 blocks, 10 queries, 64 mask points) on the
toy backbone in the synthetic toy world (128 px scenes, ``tools/data/make_synthetic_benchmarks.py
--san-toy``) with ``configs/san/san_toy_synthetic.py``. Runs are subprocesses, as a user starts
them (and as SIGKILL needs).
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import ROOT, kill_after_checkpoint, load_tool, run, short_run_options, torchrun, train_command

pytest.importorskip("mmcv.ops",
                    reason="needs full mmcv with its compiled ops: python tools/misc/build_mmcv.py")
pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

CONFIG = ROOT / "configs" / "san" / "san_toy_synthetic.py"
ITERS = 8
SMALL_HEAD = dict(side_width=48, side_heads=2, side_mlp=96, side_depth=4, num_queries=10,
                  decoder_channels=32, decoder_hidden=32, side_image_size=128)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The toy world: 6 training scenes (base labels), 3 held-out evaluation scenes."""
    out = tmp_path_factory.mktemp("toy_world")
    world = load_tool("data/make_synthetic_benchmarks")
    return world.write_san_toy(out, num_train=6, num_val=3, seed=0, size=128)


def options(world, cache: Path, **overrides) -> list[str]:
    """cfg-options for a small, fast SAN run on the toy world."""
    return short_run_options(ITERS, {
        "train_dataloader.dataset.dataset.data_root": str(world["train"]),
        "test_dataloader.dataset.data_root": str(world["eval"]),
        "model.backbone.cache_dir": str(cache),
        **{f"model.head.{k}": v for k, v in SMALL_HEAD.items()},
        "model.criterion.num_points": "64",
        "train_dataloader.batch_size": "2",
        "optim_wrapper.optimizer.lr": "1e-4",
    }, overrides)


def head_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted run of ITERS iterations: its work dir."""
    work = tmp_path_factory.mktemp("reference")
    result = run(train_command(CONFIG, work, options(world, work / "cache")), cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (work / f"iter_{ITERS}.pth").is_file()
    return work


# --------------------------------------------------------------------------------------------


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(world, reference, tmp_path):
    """SIGKILL after the first checkpoint, before the end; --resume; the final head weights and
    optimizer state equal the uninterrupted run's exactly."""
    work = tmp_path / "killed"
    opts = options(world, work / "cache")
    kill_after_checkpoint(train_command(CONFIG, work, opts), tmp_path, work / "iter_2.pth", 240)
    assert not (work / f"iter_{ITERS}.pth").exists(), "killed too late: the run had finished"
    left = sorted(int(p.stem.split("_")[1]) for p in work.glob("iter_*.pth"))
    assert left and max(left) < ITERS
    for step in left:  # every checkpoint in place is complete (a kill leaves at most a temporary)
        torch.load(work / f"iter_{step}.pth", map_location="cpu", weights_only=True)

    result = run(train_command(CONFIG, work, opts, "--resume"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Load checkpoint from {work / f'iter_{max(left)}.pth'}" in result.stdout + result.stderr
    assert not list(work.glob(".*.tmp"))  # the resumed run removed what the kill left behind
    resumed = torch.load(work / f"iter_{ITERS}.pth", map_location="cpu", weights_only=True)
    straight = torch.load(reference / f"iter_{ITERS}.pth", map_location="cpu", weights_only=True)
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for index, state in straight["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][index][name]),
                               torch.as_tensor(value)), (index, name)
    assert resumed["param_schedulers"] == straight["param_schedulers"]


def test_two_processes_train_to_the_weights_of_one(world, reference, tmp_path):
    """torchrun, 2 processes × 1 image (gloo, CPU) against 1 process × 2 images: same global
    batch, same draws, same weights up to float rounding (gradients are averaged in another
    order)."""
    pytest.importorskip("torch.distributed.run")
    work = tmp_path / "two"
    opts = options(world, work / "cache", **{"train_dataloader.batch_size": 1})
    run(torchrun(str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir", str(work),
                 "--cfg-options", *opts), cwd=tmp_path, check=True)
    one, two = head_weights(reference / f"iter_{ITERS}.pth"), head_weights(work / f"iter_{ITERS}.pth")
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - head_weights(reference / "iter_2.pth")[k]).abs().max()) for k in one)
    print(f"max abs difference, 2 processes vs 1 after {ITERS} iterations: {worst:.3g}")
    assert worst <= 1e-5 and moved > 1e-4  # equal, and training did change the weights


def test_a_non_finite_loss_stops_training_naming_the_iteration(world, tmp_path):
    """A learning rate of 1e12 blows the weights up after the first update: the run stops with one
    line naming the first iteration whose loss is not finite; every earlier loss was finite."""
    work = tmp_path / "nan"
    opts = options(world, work / "cache", **{"optim_wrapper.optimizer.lr": 1e12,
                                             "optim_wrapper.clip_grad": None,
                                             "custom_hooks": "[]"})  # no progress bar on stderr
    result = run(train_command(CONFIG, work, opts), cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: the training loss is not finite at iteration (\d+) \(loss \S+, .*\); "
                         r"lower the learning rate .* --resume", line)
    assert match, line
    failed = int(match.group(1))
    log = result.stdout + result.stderr
    logged = [float(v) for v in re.findall(r"Iter\(train\) \[\s*\d+/\d+\] .*? loss: (\S+) ", log)]
    assert 1 < failed <= ITERS and len(logged) == failed - 1 and all(np.isfinite(logged)), (failed, logged)
    saved = [int(p.stem.split("_")[1]) for p in work.glob("iter_*.pth")]
    assert all(step < failed for step in saved)  # no checkpoint of the broken weights


def test_the_loss_falls_on_a_repeated_batch(world, tmp_path):
    """Ten AdamW steps on one fixed batch (no augmentation) through the segmentor's loss: the
    total loss falls at every step, by a fifth in all."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.datasets.transforms import PackSegInputs
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(CONFIG))  # imports ovdense.mm
    cfg.merge_from_dict(_parse(options(world, tmp_path / "cache")))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    images = sorted((Path(world["train"]) / "images" / "train2017").glob("*.jpg"))[:2]
    batch = {"inputs": [], "data_samples": []}
    for path in images:
        bgr = np.array(Image.open(path).convert("RGB"))[..., ::-1].copy()
        label_file = Path(world["train"]) / "annotations" / "train2017" / f"{path.stem}_labelTrainIds.png"
        labels = np.array(Image.open(label_file)).astype(np.int64)
        packed = PackSegInputs()(dict(img=bgr, gt_seg_map=labels, seg_fields=["gt_seg_map"],
                                      img_shape=bgr.shape[:2], ori_shape=bgr.shape[:2]))
        batch["inputs"].append(packed["inputs"])
        batch["data_samples"].append(packed["data_samples"])
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        data = model.data_preprocessor(batch, training=True)
        loss, _ = model.parse_losses(model.loss(data["inputs"], data["data_samples"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    print("losses:", [round(v, 3) for v in losses])
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_checkpoints_hold_the_head_only(reference):
    """The checkpoint (weights-only loadable) holds exactly the head's parameters: no backbone
    tensor; the exported san_head.safetensors loads as the same head."""
    from ovdense import create_backbone
    from ovdense.heads.san import load_head

    state = head_weights(reference / f"iter_{ITERS}.pth")
    assert state and all(k.startswith("head.") for k in state), sorted(state)[:5]
    backbone = create_backbone("toy", cache_dir=reference / "cache")
    clip_shapes = {tuple(v.shape) for v in backbone.model.state_dict().values() if v.dim() >= 2}
    head = load_head(reference / "san_head.safetensors", backbone)
    assert {f"head.{k}" for k in head.state_dict()} == set(state)
    for key, value in head.state_dict().items():
        assert torch.equal(value, state[f"head.{key}"]), key
    # the only CLIP-shaped tensor is SAN's own trained copy of the position embedding
    same_shape = [k for k, v in state.items() if tuple(v.shape) in clip_shapes]
    assert same_shape == ["head.clip_pos_embed"], same_shape
    assert not torch.equal(state["head.clip_pos_embed"], backbone.model.visual.positional_embedding)
    assert (reference / "loss.png").stat().st_size > 0


def test_tools_test_scores_the_trained_head_as_san_segmenter_does(world, reference, tmp_path):
    """tools/test.py on the held-out scenes (all 30 pairs + background) with the trained
    checkpoint: mIoU equal to one computed from SanSegmenter's labels and the label files."""
    from ovdense import create_backbone
    from ovdense.backbone.prompts import Vocabulary
    from ovdense.eval.segmentation import ConfusionMatrix
    from ovdense.heads.san import SanSegmenter

    metrics = load_tool("test").evaluate([
        str(CONFIG), "--checkpoint", str(reference / f"iter_{ITERS}.pth"), "--work-dir", str(tmp_path),
        "--cfg-options", *options(world, reference / "cache"),
    ])
    backbone = create_backbone("toy", cache_dir=reference / "cache")
    classes = Vocabulary.from_file(ROOT / "configs" / "_base_" / "classnames" / "toy_all.txt")
    segmenter = SanSegmenter(backbone, classes, head_checkpoint=reference / "san_head.safetensors")
    matrix = ConfusionMatrix(len(classes), ignore_index=255)
    root = Path(world["eval"])
    for path in sorted((root / "images" / "validation").glob("*.jpg")):
        truth = np.array(Image.open(root / "annotations" / "validation" / f"{path.stem}.png"))
        truth = truth.astype(np.int64)
        matrix.update(segmenter.predict(path).labels, truth)
    assert float(metrics["mIoU"]) == pytest.approx(round(100 * matrix.scores().miou, 2), abs=0.011)


def _parse(items) -> dict:
    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument("--options", nargs="+", action=DictAction)
    return parser.parse_args(["--options", *items]).options
