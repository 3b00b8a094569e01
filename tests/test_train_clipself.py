"""CLIPSelf training with tools/train.py on CPU (``ovdense/mm/clipself.py``,
``configs/clipself/clipself_toy_synthetic.py``): the dataset's samples against the method's samplers,
the optimizer's weight-decay groups against the official rule, the loss falling, exact resume after
SIGKILL, two processes equal to one, and the exported backbone that ``create_backbone`` loads.

Runs refine the toy CLIP on six rendered scenes in the COCO layout."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tool_runs import ROOT, kill_after_checkpoint, run, short_run_options, torchrun, train_command

from ovdense.errors import OvdenseError
from ovdense.train import clipself as cs

pytest.importorskip("mmseg.models", reason="needs mmsegmentation 1.2.2: pip install -e '.[mm]'")

CONFIG = ROOT / "configs" / "clipself" / "clipself_toy_synthetic.py"
ITERS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Six rendered 128 px scenes as ``train2017/*.png`` with a COCO-format file (object boxes)."""
    from ovdense.data import rle
    from ovdense.data.synthetic import SceneConfig, render_scene

    root = tmp_path_factory.mktemp("coco")
    (root / "train2017").mkdir()
    images, annotations = [], []
    for i in range(6):
        scene = render_scene(np.random.default_rng([5, i]), SceneConfig(size=(128, 128)))
        Image.fromarray(scene.image).save(root / "train2017" / f"{i:06d}.png")
        images.append(dict(id=i + 1, file_name=f"{i:06d}.png", width=128, height=128))
        for k, _ in enumerate(scene.objects, start=1):
            x, y, w, h = rle.bbox(scene.instance == k)
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, bbox=[x, y, w, h], category_id=1,
                                    area=w * h, iscrowd=0))
    (root / "annotations").mkdir()
    (root / "annotations" / "instances.json").write_text(json.dumps(
        dict(images=images, annotations=annotations, categories=[dict(id=1, name="object")])))
    return root


def options(world, cache: Path, **overrides) -> list[str]:
    return short_run_options(ITERS, {
        "train_dataloader.dataset.data_root": str(world),
        "train_dataloader.dataset.ann_file": "annotations/instances.json",
        "model.clip.cache_dir": str(cache),
        "train_dataloader.batch_size": "2",
    }, overrides)


def build(world, tmp_path, **dataset):
    from mmengine.config import Config
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    import ovdense.mm  # noqa: F401 - registers the modules

    init_default_scope("mmseg")
    cfg = Config.fromfile(str(CONFIG))
    cfg.train_dataloader.dataset.update(data_root=str(world), ann_file="annotations/instances.json",
                                        **dataset)
    cfg.model.clip.cache_dir = str(tmp_path / "cache")
    torch.manual_seed(0)
    return MODELS.build(cfg.model), DATASETS.build(cfg.train_dataloader.dataset), cfg


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    return build(world, tmp_path_factory.mktemp("built"))


@pytest.mark.parametrize("mode", ["grid", "proposals"])
def test_samples_are_the_methods_regions_normalised_as_the_official_transforms(world, tmp_path, mode):
    """A sample ``(index, draw, seed)`` is ``grid_regions`` / ``proposal_regions`` under the generator of
    ``(seed, draw)``; the model's normalisation of its ``[0, 1]`` pixels gives, bit for bit, the
    regions normalised with the backbone's statistics in one step (the official ``ToTensor`` then
    ``Normalize``)."""
    from ovdense.mm.clipself import _REGIONS
    from ovdense.mm.training import derive_seed

    model, dataset, _ = build(world, tmp_path, mode=mode)
    sample = dataset[(3, 17, 5)]
    again = dataset[(3, 17, 5)]
    assert torch.equal(sample["inputs"], again["inputs"]) and torch.equal(sample["data_samples"]["boxes"],
                                                                          again["data_samples"]["boxes"])
    rgb = np.array(Image.open(world / "train2017" / "000003.png"))
    rng = random.Random(derive_seed(5, _REGIONS, 17))
    mean, std = model.backbone.mean, model.backbone.std
    if mode == "grid":
        want = cs.grid_regions(rgb, rng, mean, std, size=128, crop_size=64)
    else:
        coco = json.loads((world / "annotations" / "instances.json").read_text())
        boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 4]
        want = cs.proposal_regions(rgb, boxes, rng, mean, std, size=128, crop_size=64)
    assert torch.equal((sample["inputs"][None] - model.mean) / model.std, want.image[None])
    assert torch.equal((sample["data_samples"]["crops"] - model.mean) / model.std, want.crops)
    assert torch.equal(sample["data_samples"]["boxes"], want.boxes)
    assert 0 < len(want.boxes) <= 20
    other = dataset[(3, 18, 5)]
    assert not torch.equal(other["data_samples"]["boxes"], sample["data_samples"]["boxes"]) or \
        not torch.equal(other["data_samples"]["crops"], sample["data_samples"]["crops"])


def test_weight_decay_groups_follow_the_official_rule(built):
    """mmengine's optimizer built from the config decays exactly the parameters the official
    ``exclude`` rule decays (``cs.no_decay``), at 0.1; the rest at 0; frozen parameters never step."""
    from mmengine.optim import build_optim_wrapper

    model, _, cfg = built
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): g["weight_decay"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    trainable = {n: p for n, p in names.items() if p.requires_grad}
    assert trainable and all(n.startswith("method.student.transformer.resblocks.") for n in trainable)
    for name, param in trainable.items():
        want = 0.0 if cs.no_decay(name, param) else 0.1
        assert decay[id(param)] == want, name
    assert {decay[id(p)] for p in trainable.values()} == {0.0, 0.1}


def test_the_loss_falls_on_a_repeated_batch(built):
    from mmengine.dataset import pseudo_collate

    model, dataset, _ = built
    model = model.train()
    batch = pseudo_collate([dataset[(i, i, 0)] for i in range(2)])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    losses = []
    for _ in range(8):
        loss = model(**batch, mode="loss")["loss_cosine"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_datasets_are_refused_in_one_line(world, tmp_path):
    from ovdense.mm.clipself import ClipSelfDataset

    with pytest.raises(OvdenseError, match="not found"):
        ClipSelfDataset(str(tmp_path / "none.json"))
    with pytest.raises(OvdenseError, match="mode must be one of"):
        ClipSelfDataset(str(world / "annotations" / "instances.json"), mode="boxes")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(OvdenseError, match="not a COCO-format file"):
        ClipSelfDataset(str(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_text(json.dumps(dict(images=[])))
    with pytest.raises(OvdenseError, match="lists no images"):
        ClipSelfDataset(str(tmp_path / "empty.json"))
    (tmp_path / "broken.json").write_text(json.dumps(dict(images=[dict(id=1, file_name="gone.png")])))
    with pytest.raises(OvdenseError, match="image not found"):
        ClipSelfDataset(str(tmp_path / "broken.json"), data_root=str(tmp_path))[0]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run of ITERS iterations, checkpoints every 2."""
    work = tmp_path_factory.mktemp("reference")
    run(train_command(CONFIG, work, options(world, work / "cache")), cwd=work, check=True)
    return work


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(world, reference, tmp_path):
    work = tmp_path / "killed"
    opts = options(world, work / "cache")
    kill_after_checkpoint(train_command(CONFIG, work, opts), tmp_path, work / "iter_2.pth", 240)
    assert not (work / f"iter_{ITERS}.pth").exists(), "killed too late: the run had finished"
    run(train_command(CONFIG, work, opts, "--resume"), cwd=tmp_path, check=True)
    resumed, straight = _state(work / f"iter_{ITERS}.pth"), _state(reference / f"iter_{ITERS}.pth")
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_two_processes_train_to_the_weights_of_one(world, reference, tmp_path):
    """torchrun, 2 processes × 1 image (gloo, CPU) against 1 process × 2 images: the same draws, the
    gradients averaged over the processes and weighted by each one's share of the regions (the
    images' grids have different cell counts), so the same weights up to float rounding."""
    pytest.importorskip("torch.distributed.run")
    work = tmp_path / "two"
    opts = options(world, work / "cache", **{"train_dataloader.batch_size": 1})
    run(torchrun(str(ROOT / "tools" / "train.py"), str(CONFIG), "--work-dir", str(work),
                 "--cfg-options", *opts), cwd=tmp_path, check=True)
    one, two = _state(reference / f"iter_{ITERS}.pth"), _state(work / f"iter_{ITERS}.pth")
    start = _state(reference / "iter_2.pth")
    student = [k for k in one if k.startswith("method.student.transformer.")]
    worst = max(float((one[k] - two[k]).abs().max()) for k in student)
    moved = max(float((one[k] - start[k]).abs().max()) for k in student)
    print(f"max abs difference, 2 processes vs 1 after {ITERS} iterations: {worst:.3g} (moved {moved:.3g})")
    # the warm-up keeps the first steps small (lr 1e-4 / 50 rising): a move of ~3e-4 by iteration 6
    assert worst <= 5e-6 and moved > 1e-4


def test_the_exported_backbone_is_the_alpha_merge_and_loads(reference):
    """``clipself_backbone.safetensors`` loads through ``create_backbone("toy", pretrained=...)``: its
    image tower is ``0.7 · student + 0.3 · teacher`` of the last checkpoint, the teacher the shipped
    toy tower, every other tensor the shipped toy model's; only blocks changed."""
    from ovdense import create_backbone

    state = _state(reference / f"iter_{ITERS}.pth")
    toy = create_backbone("toy", cache_dir=reference / "cache")
    refined = create_backbone("toy", pretrained=str(reference / "clipself_backbone.safetensors"),
                              cache_dir=reference / "cache")
    original = toy.model.state_dict()
    changed = 0
    for key, value in refined.model.state_dict().items():
        if key.startswith("visual."):
            inner = key[len("visual."):]
            assert torch.equal(state[f"method.teacher.{inner}"], original[key]), key
            want = 0.7 * state[f"method.student.{inner}"] + 0.3 * original[key]
            torch.testing.assert_close(value, want, atol=1e-7, rtol=0, msg=key)
            if not torch.equal(value, original[key]):
                changed += 1
                assert inner.startswith("transformer.resblocks."), key
        else:
            assert torch.equal(value, original[key]), key
    assert changed > 10
